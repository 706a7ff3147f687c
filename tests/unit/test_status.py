"""Table tests of the pure status derivation and restart decisions."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_api.constants import Reason
from finetune_api.v1alpha1 import FineTuneJob, FineTuneJobStatus, SecretKeyRef
from finetune_api.validation import parse_manifest
from finetune_operator import checkpoints, kueue
from finetune_operator.kueue import Lookup, Workload
from finetune_operator.lifecycle import (
    LostNode,
    State,
    needs_created_events,
    needs_events,
    nodes_to_read,
    observe_job,
)
from finetune_operator.reconcile import name_conflict
from finetune_operator.restarts import restarting
from finetune_operator.scrape import parse_metrics, progress_from_metrics
from finetune_operator.status import (
    Action,
    Blocker,
    Observed,
    derive_status,
    evaluation_summary,
    plan,
)

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:01:00Z"
RESULT_OK = {
    "status": "Succeeded",
    "reason": "PushedToHub",
    "message": "done",
    "evaluation": {"accuracy": {"before": 0.52, "after": 0.81}},
    "repo": "org/x",
    "revision": "abc123",
    "url": "https://hub/org/x/commit/abc123",
    "artifact": "adapter",
    "steps": 30,
    "trainLoss": 0.4,
}


def ftj(status: dict[str, Any] | None = None, **run_policy: Any) -> FineTuneJob:
    doc: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ns", "generation": 2, "uid": "u1"},
        "spec": {
            "model": {"source": "hf://org/m", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "hf://org/d"},
            "evaluation": {"metrics": ["accuracy", "f1"], "gates": {"accuracy": 0.5}},
            "resources": {"nodes": 2},
            "runPolicy": {"backoffLimit": 1, **run_policy},
        },
    }
    if status is not None:
        doc["status"] = status
    return parse_manifest(doc)


def batch_job(attempt: int = 1, cond: tuple[str, str, str] | None = None, **spec: Any) -> dict:
    conditions = []
    if cond:
        conditions.append(
            {"type": cond[0], "status": "True", "reason": cond[1], "message": cond[2]}
        )
    return {
        "metadata": {
            "name": "demo",
            "uid": f"job-{attempt}",
            "labels": {"finetune.dev/attempt": str(attempt)},
        },
        "spec": {"suspend": False, **spec},
        "status": {"conditions": conditions},
    }


def pod(index: int, phase: str, exit_code: int | None = None, message: str | None = None) -> dict:
    status: dict[str, Any] = {"phase": phase, "podIP": f"10.0.0.{index + 1}"}
    if exit_code is not None:
        term = {"exitCode": exit_code, "message": message or ""}
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
    return {
        "metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": status,
    }


def observed(job: dict | None, pods: list[dict] | None = None, **kw: Any) -> Observed:
    return Observed(now=NOW, job=job, outcome=observe_job(job, pods or []), **kw)


def cond(status: dict, type_: str) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == type_), None)


OK_MSG = json.dumps(RESULT_OK)
CASES = [
    # name, job status, observed job, pods, expected phase, expected actions, attempts
    ("no job yet", None, None, [], "Pending", ["create"], 1),
    ("pending pods", {"attempts": 1}, batch_job(), [pod(0, "Pending")], "Pending", [], 1),
    (
        "running",
        {"attempts": 1},
        batch_job(),
        [pod(0, "Running"), pod(1, "Running")],
        "Running",
        [],
        1,
    ),
    (
        "succeeded",
        {"attempts": 1},
        batch_job(cond=("Complete", "CompletionsReached", "")),
        [pod(0, "Succeeded", 0, OK_MSG), pod(1, "Succeeded", 0)],
        "Succeeded",
        [],
        1,
    ),
    (
        "retryable failure restarts",
        {"attempts": 1},
        batch_job(
            cond=("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        ),
        [pod(0, "Failed", 1), pod(1, "Failed", 137)],
        "Pending",
        ["delete"],
        2,
    ),
    (
        "backoff limit exceeded",
        {"attempts": 2},
        batch_job(attempt=2, cond=("Failed", "BackoffLimitExceeded", "limit")),
        [pod(0, "Failed", 1)],
        "Failed",
        [],
        2,
    ),
    (
        "permanent exit code 4",
        {"attempts": 1},
        batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 4")),
        [
            pod(
                0,
                "Failed",
                4,
                json.dumps(
                    {
                        "status": "Failed",
                        "reason": "EvaluationGateFailed",
                        "message": "accuracy 0.3 < 0.5",
                    }
                ),
            )
        ],
        "Failed",
        [],
        1,
    ),
    (
        "permanent by the podFailurePolicy when the pods and their result are gone",
        {"attempts": 1},
        batch_job(
            cond=(
                "Failed",
                "PodFailurePolicy",
                "Container trainer for pod ns/demo-0-x failed with exit code 3 matching "
                "FailJob rule at index 0",
            )
        ),
        [],
        "Failed",
        [],
        1,
    ),
    (
        "stale attempt is deleted",
        {"attempts": 2},
        batch_job(attempt=1),
        [],
        "Pending",
        ["delete"],
        2,
    ),
    (
        "created then crashed before status write",
        {"attempts": 1},
        batch_job(attempt=3),
        [],
        "Pending",
        [],
        3,
    ),
]


@pytest.mark.parametrize(
    ("name", "prev", "job", "pods", "phase", "actions", "attempts"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_plan_table(
    name: str, prev: Any, job: Any, pods: Any, phase: str, actions: list[str], attempts: int
) -> None:
    result = plan(ftj(prev), observed(job, pods))
    assert result.status["phase"] == phase
    assert [a.kind for a in result.actions] == actions
    assert result.status["attempts"] == attempts
    assert result.status["observedGeneration"] == 2
    for c in result.status["conditions"]:
        assert c["observedGeneration"] == 2
        assert c["lastTransitionTime"]


def test_success_carries_evaluation_result_and_summary() -> None:
    job = batch_job(cond=("Complete", "CompletionsReached", ""))
    status = derive_status(ftj({"attempts": 1}), observed(job, [pod(0, "Succeeded", 0, OK_MSG)]))
    assert status["evaluation"] == {"accuracy": {"before": 0.52, "after": 0.81}}
    assert status["evaluationSummary"] == "accuracy 0.52→0.81"
    assert status["result"]["revision"] == "abc123"
    assert status["result"]["repo"] == "org/x"
    assert status["progress"]["percent"] == 100
    assert status["progress"]["step"] == 30
    assert status["completionTime"] == NOW
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types["Succeeded"] == types["Evaluated"] == types["Pushed"] == "True"


@pytest.mark.parametrize(
    ("where", "expected", "message"),
    [
        ({"branch": "main"}, {"branch": "main"}, "org/x@abc123"),
        ({"branch": "exp/1"}, {"branch": "exp/1"}, "org/x@abc123 on branch exp/1"),
        (
            {"prRevision": "refs/pr/2", "prUrl": "https://hub/org/x/discussions/2"},
            {"prRevision": "refs/pr/2", "prUrl": "https://hub/org/x/discussions/2"},
            "org/x@abc123, pull request refs/pr/2 (https://hub/org/x/discussions/2)",
        ),
        ({}, {}, "org/x@abc123"),  # a trainer from before these fields
    ],
)
def test_status_records_where_the_push_landed(
    where: dict[str, str], expected: dict[str, str], message: str
) -> None:
    job = batch_job(cond=("Complete", "CompletionsReached", ""))
    result = json.dumps({**RESULT_OK, **where})
    status = derive_status(ftj({"attempts": 1}), observed(job, [pod(0, "Succeeded", 0, result)]))
    landed = {k: v for k, v in status["result"].items() if k in ("branch", "prRevision", "prUrl")}
    assert landed == expected
    pushed = cond(status, "Pushed")
    assert pushed is not None and pushed["message"] == message
    # What the status holds is what the CRD's status schema declares.
    FineTuneJobStatus.model_validate(status)


def test_gate_failure_reason_comes_from_the_trainer() -> None:
    case = CASES[6]
    status = derive_status(ftj(case[1]), observed(case[2], case[3]))
    failed = cond(status, "Failed")
    assert failed and failed["reason"] == "EvaluationGateFailed"
    assert "accuracy 0.3" in failed["message"]


def test_a_gate_failure_read_from_rank_1_first_still_shows_the_scores() -> None:
    """The Job fails as soon as any pod exits with the gate's code, so a pass may find only rank
    1's pod ended while rank 0's still runs (serving its last metrics): the status it writes is
    final, so rank 1's result repeats rank 0's whole verdict."""
    verdict = {
        "status": "Failed",
        "reason": "EvaluationGateFailed",
        "message": "perplexity 68.2 > 1.0; nothing was pushed",
        "evaluation": {"perplexity": {"before": 426.7, "after": 68.2}},
        "steps": 20,
    }
    job = batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 4"))
    pods = [pod(0, "Running"), pod(1, "Failed", 4, json.dumps({**verdict, "rank": 1}))]
    status = derive_status(ftj({"attempts": 1}), observed(job, pods))
    failed = cond(status, "Failed")
    assert failed is not None and failed["reason"] == "EvaluationGateFailed"
    assert status["evaluation"] == {"perplexity": {"before": 426.7, "after": 68.2}}
    assert status["progress"]["step"] == 20


def test_permanent_failure_without_a_result_is_final_and_says_the_result_was_lost() -> None:
    # The verdict's reason travels only in the result; the exit code in the Job's message is
    # not parsed. The podFailurePolicy ended the Job, so no attempt is retried either way.
    case = CASES[7]
    status = derive_status(ftj(case[1]), observed(case[2], case[3]))
    failed = cond(status, "Failed")
    assert failed is not None and failed["reason"] == "TrainingFailed"
    assert "result was lost" in failed["message"] and "exit code 3" in failed["message"]


def test_retryable_failure_keeps_the_trainers_reason() -> None:
    pushed = {"status": "Failed", "reason": "PushFailed", "message": "503 from the Hub"}
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    out = observe_job(job, [pod(0, "Failed", 1, json.dumps(pushed))])
    assert out.state is State.FAILED and not out.permanent
    assert out.reason == "PushFailed" and out.message.endswith("503 from the Hub")


@pytest.mark.parametrize(
    ("reason", "extra"),
    [("PushFailed", {"retryable": False}), ("ModelNotFound", {}), ("DatasetNotFound", {})],
)
def test_refused_push_and_missing_sources_end_the_job_with_their_reason(
    reason: str, extra: dict[str, Any]
) -> None:
    """The trainer's permanent verdicts (exit code 3, by the podFailurePolicy) keep their own
    reason: not TrainingFailed, not a retry."""
    result = {"status": "Failed", "reason": reason, "message": "refused by http://hub", **extra}
    job = batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 3"))
    out = observe_job(job, [pod(0, "Failed", 3, json.dumps(result))])
    assert out.state is State.FAILED and out.permanent
    assert (out.reason, out.message) == (reason, "refused by http://hub")


def test_another_ranks_device_out_of_memory_ends_the_job_over_rank_0s_stop() -> None:
    """Rank 1 ran out of GPU memory (exit 3); rank 0, waiting for it in a collective, got the
    Job controller's SIGTERM as the Job failed: the out-of-memory verdict is the job's."""
    oom = {"status": "Failed", "reason": "DeviceOutOfMemory", "rank": 1, "message": "GPU 1"}
    stopped = {"status": "Failed", "reason": "Interrupted", "message": "SIGTERM"}
    job = batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 3"))
    pods = [pod(0, "Failed", 143, json.dumps(stopped)), pod(1, "Failed", 3, json.dumps(oom))]
    out = observe_job(job, pods)
    assert out.state is State.FAILED and out.permanent
    assert (out.reason, out.message) == ("DeviceOutOfMemory", "GPU 1")


def test_rank0_result_wins_over_other_ranks() -> None:
    rank1 = {"status": "Failed", "reason": "TrainingFailed", "rank": 1}
    gate = {"status": "Failed", "reason": "EvaluationGateFailed", "message": "f1 too low"}
    job = batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 4"))
    pods = [pod(1, "Failed", 4, json.dumps(rank1)), pod(0, "Failed", 4, json.dumps(gate))]
    out = observe_job(job, pods)
    assert out.permanent and out.reason == "EvaluationGateFailed"


def test_backoff_exceeded_reason() -> None:
    case = CASES[5]
    status = derive_status(ftj(case[1]), observed(case[2], case[3]))
    assert cond(status, "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]


def test_terminal_is_sticky_even_when_the_job_is_gone() -> None:
    done = derive_status(
        ftj({"attempts": 1}),
        observed(batch_job(cond=("Complete", "", "")), [pod(0, "Succeeded", 0, OK_MSG)]),
    )
    again = plan(ftj(done), Observed(now=LATER))
    assert again.actions == []
    assert again.status["phase"] == "Succeeded"
    assert again.transitions == []


def test_the_ttl_deletes_a_finished_job_only_once_its_verdict_is_written() -> None:
    """runPolicy.ttlSecondsAfterFinished is the operator's to run: a Job the Job controller
    deleted before a pass read its outcome would be made again."""
    complete = batch_job(cond=("Complete", "", ""))
    pods = [pod(0, "Succeeded", 0, OK_MSG), pod(1, "Succeeded", 0)]
    finishing = plan(ftj({"attempts": 1}, ttlSecondsAfterFinished=30), observed(complete, pods))
    # The pass that finds it finished writes the verdict and deletes nothing yet.
    assert finishing.status["phase"] == "Succeeded"
    assert finishing.actions == []
    assert finishing.requeue_after == 30
    done = ftj(finishing.status, ttlSecondsAfterFinished=30)
    early = plan(done, Observed(now=NOW, job=complete, outcome=observe_job(complete, pods)))
    assert (early.actions, early.requeue_after) == ([], 30)
    at_ttl = "2026-01-01T00:00:30Z"
    due = plan(done, Observed(now=at_ttl, job=complete, outcome=observe_job(complete, pods)))
    assert due.actions == [Action("delete", attempt=1, uid="job-1")]
    assert due.status["phase"] == "Succeeded"
    gone = plan(done, Observed(now=LATER))
    assert (gone.actions, gone.requeue_after, gone.status["phase"]) == ([], None, "Succeeded")
    # No TTL: the Job stays, and nothing is asked for later.
    kept = plan(
        ftj(finishing.status),
        Observed(now=LATER, job=complete, outcome=observe_job(complete, pods)),
    )
    assert (kept.actions, kept.requeue_after) == ([], None)


def test_same_observation_twice_changes_nothing() -> None:
    first = derive_status(ftj({"attempts": 1}), observed(batch_job(), [pod(0, "Running")]))
    second = plan(
        ftj(first),
        Observed(now=LATER, job=batch_job(), outcome=observe_job(batch_job(), [pod(0, "Running")])),
    )
    assert second.status == first
    assert second.transitions == []


INTERRUPTED = json.dumps(
    {"status": "Failed", "reason": "Interrupted", "message": "SIGTERM: saved step 40", "rank": 0}
)


def test_suspend_is_suspending_until_the_pods_are_gone_then_resumes() -> None:
    # runPolicy.suspend=true on a running gang: the Job is patched, and nothing says Suspended yet.
    running = [pod(0, "Running"), pod(1, "Running")]
    first = plan(ftj({"attempts": 1}, suspend=True), observed(batch_job(), running))
    assert [(a.kind, a.patch) for a in first.actions] == [("patch", {"suspend": True})]
    suspended = cond(first.status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("False", "Suspending")  # type: ignore[index]
    assert "SIGTERM" in suspended["message"]  # type: ignore[index]
    # The pods still run (saving their checkpoint), so the job still reads Running.
    assert cond(first.status, "Running")["reason"] == "Suspending"  # type: ignore[index]
    assert first.status["phase"] == "Running"
    # The Job is suspended; its pods got SIGTERM and are still saving the checkpoint.
    second = plan(ftj(first.status, suspend=True), observed(batch_job(suspend=True), running))
    assert second.actions == []
    suspended = cond(second.status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("False", "Suspending")  # type: ignore[index]
    assert "2 pod(s) are stopping" in suspended["message"]  # type: ignore[index]
    # Rank 0 exited Interrupted after its save, rank 1 is gone: now it is suspended.
    gone = [pod(0, "Failed", 1, INTERRUPTED)]
    third = plan(ftj(second.status, suspend=True), observed(batch_job(suspend=True), gone))
    assert third.actions == []
    assert third.status["phase"] == "Suspended"
    assert cond(third.status, "Suspended")["status"] == "True"  # type: ignore[index]
    assert cond(third.status, "Running")["reason"] == "Suspended"  # type: ignore[index]
    assert ("Suspended", "Suspended") in [(t, r) for t, r, _ in third.transitions]
    # runPolicy.suspend=false: the Job is unsuspended, and the trainer resumes from its checkpoint.
    fourth = plan(ftj(third.status), observed(batch_job(suspend=True), []))
    assert [(a.kind, a.patch) for a in fourth.actions] == [("patch", {"suspend": False})]
    resumed = cond(fourth.status, "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "Resumed")  # type: ignore[index]
    fifth = plan(ftj(fourth.status), observed(batch_job(suspend=False), [pod(0, "Pending")]))
    assert fifth.status["phase"] == "Pending"
    assert cond(fifth.status, "Running")["reason"] == "Resumed"  # type: ignore[index]


def test_resume_while_still_suspending_is_resumed() -> None:
    suspending = plan(
        ftj({"attempts": 1}, suspend=True), observed(batch_job(suspend=True), [pod(0, "Running")])
    )
    resumed = plan(ftj(suspending.status), observed(batch_job(suspend=True), [pod(0, "Running")]))
    assert [a.patch for a in resumed.actions] == [{"suspend": False}]
    assert cond(resumed.status, "Suspended")["reason"] == "Resumed"  # type: ignore[index]


def test_queued_job_suspend_is_left_to_kueue() -> None:
    result = plan(ftj({"attempts": 1}, queueName="q"), observed(batch_job(suspend=True), []))
    assert result.actions == []
    assert result.status["phase"] == "Pending"
    queued = cond(result.status, "Running")
    assert queued["reason"] == "Queued"  # type: ignore[index]
    assert queued["message"].startswith("waiting for Kueue queue q")  # type: ignore[index]


WL = "job-demo-1a2b3"


def workload(
    active: bool | None = True, *conditions: tuple[str, str, str, str], cq: str = ""
) -> Workload:
    """The Job's Workload as Kueue writes it; conditions are (type, status, reason, message)."""
    spec: dict[str, Any] = {"queueName": "q"}
    if active is not None:
        spec["active"] = active
    status: dict[str, Any] = {
        "conditions": [
            {"type": t, "status": st, "reason": r, "message": m} for t, st, r, m in conditions
        ]
    }
    if cq:
        status["admission"] = {"clusterQueue": cq}
    obj = {
        "metadata": {
            "name": WL,
            "uid": "wl-1",
            "labels": {"kueue.x-k8s.io/job-uid": "job-1"},
            "ownerReferences": [
                {"kind": "Job", "name": "demo", "uid": "job-1", "controller": True}
            ],
        },
        "spec": spec,
        "status": status,
    }
    return kueue.read(Lookup.FOUND, obj)


ADMITTED = (("QuotaReserved", "True", "QuotaReserved", ""), ("Admitted", "True", "Admitted", ""))
DEACTIVATED = (
    ("Evicted", "True", "Deactivated", "The workload is deactivated"),
    ("QuotaReserved", "False", "Pending", "The workload is deactivated"),
)


def test_queued_suspend_deactivates_the_workload_and_waits_for_kueue() -> None:
    running = [pod(0, "Running"), pod(1, "Running")]
    job = ftj({"attempts": 1}, queueName="q", suspend=True)
    first = plan(job, observed(batch_job(), running, workload=workload(True, *ADMITTED, cq="cq")))
    # Only the field Kueue leaves to others: Workload.spec.active. Job.spec.suspend is Kueue's.
    assert first.actions == [Action("activate", uid="wl-1", name=WL, patch={"active": False})]
    suspended = cond(first.status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("False", "Suspending")  # type: ignore[index]
    assert f"Kueue Workload {WL} is deactivated" in suspended["message"]  # type: ignore[index]
    assert first.status["phase"] == "Running"
    # Kueue evicted it and suspended the Job; the pods save their checkpoint.
    evicted = workload(False, *DEACTIVATED)
    stopping = ftj(first.status, queueName="q", suspend=True)
    second = plan(stopping, observed(batch_job(suspend=True), running, workload=evicted))
    assert second.actions == []
    assert "2 pod(s) are stopping" in cond(second.status, "Suspended")["message"]  # type: ignore[index]
    third = plan(
        ftj(second.status, queueName="q", suspend=True),
        observed(batch_job(suspend=True), [], workload=evicted),
    )
    assert third.actions == []
    assert third.status["phase"] == "Suspended"
    suspended = cond(third.status, "Suspended")
    assert suspended["status"] == "True"  # type: ignore[index]
    assert "spec.active=false" in suspended["message"]  # type: ignore[index]
    # Resume: the Workload is activated again and queues; Kueue admits it when it has quota.
    fourth = plan(
        ftj(third.status, queueName="q"), observed(batch_job(suspend=True), [], workload=evicted)
    )
    assert fourth.actions == [Action("activate", uid="wl-1", name=WL, patch={"active": True})]
    assert cond(fourth.status, "Suspended")["reason"] == "Resumed"  # type: ignore[index]
    assert "Deactivated" not in [r for _, r, _ in fourth.transitions]
    pending = workload(True, ("QuotaReserved", "False", "Pending", "insufficient quota for cpu"))
    fifth = plan(
        ftj(fourth.status, queueName="q"), observed(batch_job(suspend=True), [], workload=pending)
    )
    assert fifth.actions == []
    queued = cond(fifth.status, "Running")
    assert queued["reason"] == "Queued"  # type: ignore[index]
    assert queued["message"] == "waiting for Kueue queue q: insufficient quota for cpu"  # type: ignore[index]
    admitted = workload(True, *ADMITTED, cq="cq")
    sixth = plan(
        ftj(fifth.status, queueName="q"),
        observed(batch_job(), [pod(0, "Pending")], workload=admitted),
    )
    assert cond(sixth.status, "Running")["reason"] == "Admitted"  # type: ignore[index]
    assert "ClusterQueue cq" in cond(sixth.status, "Running")["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("lookup", "says"),
    [
        (Lookup.NOT_YET, "Kueue has not created the Job's Workload yet"),
        (Lookup.NO_KUEUE, "is Kueue installed?"),
        (Lookup.FORBIDDEN, "may not read Kueue Workloads"),
    ],
)
def test_queued_without_a_workload_says_why(lookup: Lookup, says: str) -> None:
    wl = kueue.read(lookup, None)
    queued = plan(
        ftj({"attempts": 1}, queueName="q"), observed(batch_job(suspend=True), [], workload=wl)
    )
    assert queued.actions == []
    assert cond(queued.status, "Running")["reason"] == "Queued"  # type: ignore[index]
    assert says in cond(queued.status, "Running")["message"]  # type: ignore[index]
    # Suspending such a Job fails nothing: it is suspended (born so) and has no pods.
    suspended = plan(
        ftj(queued.status, queueName="q", suspend=True),
        observed(batch_job(suspend=True), [], workload=wl),
    )
    assert suspended.actions == []
    assert suspended.status["phase"] == "Suspended"
    assert says in cond(suspended.status, "Suspended")["message"]  # type: ignore[index]
    # A Job someone else unsuspended cannot be suspended without Kueue: Suspending says why.
    running = plan(
        ftj(queued.status, queueName="q", suspend=True),
        observed(batch_job(), [pod(0, "Running")], workload=wl),
    )
    assert running.actions == []
    stuck = cond(running.status, "Suspended")
    assert (stuck["status"], stuck["reason"]) == ("False", "Suspending")  # type: ignore[index]
    assert says in stuck["message"]  # type: ignore[index]


def test_a_workload_kueue_deactivated_is_not_reactivated() -> None:
    """Kueue deactivates workloads itself (e.g. past their requeuing limit); only what this
    FineTuneJob's suspend deactivated is activated again."""
    limit = workload(
        False, ("Evicted", "True", "Deactivated", "exceeded the maximum number of re-queuing")
    )
    result = plan(
        ftj({"attempts": 1}, queueName="q"), observed(batch_job(suspend=True), [], workload=limit)
    )
    assert result.actions == []
    running = cond(result.status, "Running")
    assert running["reason"] == "Deactivated"  # type: ignore[index]
    assert "re-queuing" in running["message"]  # type: ignore[index]


def test_a_refused_change_of_spec_active_is_shown_and_left_for_the_next_pass() -> None:
    refusal = "Workload.kueue.x-k8s.io is invalid: some rule of Kueue's"
    admitted = replace(workload(True, *ADMITTED, cq="cq"), refused=refusal)
    suspend = plan(
        ftj({"attempts": 1}, queueName="q", suspend=True),
        observed(batch_job(), [pod(0, "Running")], workload=admitted),
    )
    assert suspend.actions == []
    suspending = cond(suspend.status, "Suspended")
    assert suspending["reason"] == "Suspending"  # type: ignore[index]
    assert suspending["message"].endswith(f"refused spec.active=false: {refusal}")  # type: ignore[index]
    # Resuming, refused: still Suspended (it is), so the next pass activates it again.
    suspended = plan(
        ftj({"attempts": 1}, queueName="q", suspend=True),
        observed(batch_job(suspend=True), [], workload=workload(False, *DEACTIVATED)),
    )
    assert suspended.status["phase"] == "Suspended"
    deactivated = replace(workload(False, *DEACTIVATED), refused=refusal)
    resume = plan(
        ftj(suspended.status, queueName="q"),
        observed(batch_job(suspend=True), [], workload=deactivated),
    )
    assert resume.actions == []
    assert resume.status["phase"] == "Suspended"
    assert "refused spec.active=true" in cond(resume.status, "Suspended")["message"]  # type: ignore[index]
    retry = plan(
        ftj(resume.status, queueName="q"),
        observed(batch_job(suspend=True), [], workload=workload(False, *DEACTIVATED)),
    )
    assert retry.actions == [Action("activate", uid="wl-1", name=WL, patch={"active": True})]


def test_preempted_workload_reads_queued_while_its_pods_stop() -> None:
    preempted = workload(
        True,
        ("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority workload"),
        ("QuotaReserved", "False", "Pending", "couldn't assign flavors"),
    )
    result = plan(
        ftj({"attempts": 1}, queueName="q"),
        observed(batch_job(suspend=True), [pod(0, "Running")], workload=preempted),
    )
    assert result.actions == []
    message = cond(result.status, "Running")["message"]  # type: ignore[index]
    assert message.startswith("waiting for Kueue queue q: 1 pod(s) stopping")
    assert "evicted by Kueue (Preempted)" in message and "couldn't assign flavors" in message


def test_observe_counts_pods_still_stopping_in_a_suspended_job() -> None:
    out = observe_job(batch_job(suspend=True), [pod(0, "Running"), pod(1, "Failed", 1)])
    assert (out.state, out.live_pods, out.running_pods) == (State.SUSPENDED, 1, 1)


def test_kueue_workload_is_found_by_its_controller_reference() -> None:
    def wl(name: str, uid: str, controller: bool) -> dict:
        ref = {"kind": "Job", "name": "demo", "uid": uid, "controller": controller}
        return {"metadata": {"name": name, "ownerReferences": [ref]}}

    items = [wl("other", "job-0", True), wl("borrowed", "job-1", False), wl(WL, "job-1", True)]
    assert kueue.owned_by(items, "job-1")["metadata"]["name"] == WL  # type: ignore[index]
    assert kueue.owned_by(items, "job-2") is None
    assert kueue.read(Lookup.FOUND, None).lookup is Lookup.NOT_YET
    # spec.active unset is active (the field defaults to true).
    assert workload(None).active is True


def test_a_workload_names_its_finetunejob_through_the_pod_template() -> None:
    labels = {"app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/job-name": "demo"}
    ours = {"spec": {"podSets": [{"name": "main", "template": {"metadata": {"labels": labels}}}]}}
    assert kueue.finetunejob_of(ours) == "demo"
    other = {"spec": {"podSets": [{"name": "main", "template": {"metadata": {"labels": {}}}}]}}
    assert kueue.finetunejob_of(other) is None
    assert kueue.finetunejob_of({}) is None


def test_missing_secret_blocks_without_failing() -> None:
    result = plan(
        ftj(), Observed(now=NOW, blocker=Blocker(Reason.SECRET_NOT_FOUND, "Secret hf not found"))
    )
    assert result.actions == []
    assert cond(result.status, "Created")["reason"] == "SecretNotFound"  # type: ignore[index]
    assert result.status["phase"] == "Pending"
    # Running, which explains a Pending job (kubectl's Reason column, the per-job series), says
    # the same; one Event says it once.
    running = cond(result.status, "Running")
    assert running is not None and (running["status"], running["reason"]) == (
        "False",
        "SecretNotFound",
    )
    assert [t[:2] for t in result.transitions] == [("NotCreated", "SecretNotFound")]
    # The Secret made, the Job's pods on their way: Running says so, not the old blocker.
    made = plan(ftj(result.status), observed(batch_job(), [pod(0, "Pending"), pod(1, "Pending")]))
    running = cond(made.status, "Running")
    assert running is not None and running["reason"] == "PodsPending"
    assert cond(made.status, "Created")["status"] == "True"  # type: ignore[index]
    # A running job whose Secret is deleted since stays Running: its pods hold the token.
    going = plan(ftj(), observed(batch_job(), [pod(0, "Running"), pod(1, "Running")]))
    assert going.status["phase"] == "Running"
    blocked = Observed(
        now=NOW,
        job=batch_job(),
        outcome=observe_job(batch_job(), [pod(0, "Running"), pod(1, "Running")]),
        blocker=Blocker(Reason.SECRET_NOT_FOUND, "Secret hf not found"),
    )
    still = plan(ftj(going.status), blocked)
    assert still.status["phase"] == "Running"
    assert cond(still.status, "Running")["reason"] == "PodsRunning"  # type: ignore[index]


def test_apply_rejected_fails() -> None:
    result = plan(
        ftj(), Observed(now=NOW, blocker=Blocker(Reason.APPLY_REJECTED, "422", permanent=True))
    )
    assert result.status["phase"] == "Failed"


def test_deleting_job_waits() -> None:
    job = batch_job(attempt=1)
    job["metadata"]["deletionTimestamp"] = NOW
    result = plan(ftj({"attempts": 2}), observed(job))
    assert result.actions == []
    assert observe_job(job, []).deleting


def test_a_pod_that_outlives_its_grace_period_holds_the_restart_and_says_so() -> None:
    """Attempt 1's Job is being deleted for attempt 2 (foreground: it stays until its pods are
    gone). Rank 1's pod, on a node that stopped answering, is still there after its grace period
    ended at NOW: the operator looks again when it counts as stuck, then says what holds the
    restart back and what to do, with a Warning Event."""
    job = batch_job(attempt=1)
    job["metadata"]["deletionTimestamp"] = "2025-12-31T23:59:50Z"
    gone = [pod(0, "Failed", 1), pod(1, "Running"), pod(2, "Running")]
    ends = ("2025-12-31T23:59:58Z", NOW, NOW)
    for index, (p, end) in enumerate(zip(gone, ends, strict=True)):
        p["metadata"].update(name=f"demo-{index}-x", deletionTimestamp=end)
    gone[1]["spec"] = {"nodeName": "gpu-node-7"}
    # As the node lifecycle controller marks a pod whose node stopped answering.
    gone[1]["status"].update(
        reason="NodeLost", message="Node gpu-node-7 which was running pod demo-1-x is unresponsive"
    )
    restarting_status = {
        "attempts": 2,
        "conditions": [
            {"type": "Running", "status": "False", "reason": "Restarting", "message": "m"}
        ],
    }
    outcome = observe_job(job, gone)
    # The earliest deletionTimestamp first: rank 0's pod, which its kubelet is about to remove.
    assert outcome.lingering is not None and outcome.lingering.until == "2025-12-31T23:59:58Z"
    assert outcome.lingering.others == 2
    gone = gone[1:]  # rank 0's went, as it should
    outcome = observe_job(job, gone)
    assert outcome.lingering is not None
    assert (outcome.lingering.pod, outcome.lingering.node) == ("demo-1-x", "gpu-node-7")

    # Within the slack: nothing to say yet; a pass comes back when it is up (a second late).
    early = plan(ftj(restarting_status), observed(job, gone), stuck_after=60)
    assert early.actions == []
    assert cond(early.status, "Running")["reason"] == "Restarting"  # type: ignore[index]
    assert early.requeue_after == 61
    # Past it: Running says why the restart waits and what to do; nothing is deleted by force.
    late = replace(observed(job, gone), now="2026-01-01T00:01:01Z")
    held = plan(ftj(restarting_status), late, stuck_after=60)
    assert held.actions == [] and held.requeue_after is None
    running = cond(held.status, "Running")
    assert running is not None and running["reason"] == Reason.POD_STUCK_TERMINATING
    message = running["message"]
    assert message.startswith(
        "pod demo-1-x on node gpu-node-7 (and 1 more of its pods) of attempt 1 is still "
        "terminating, although its grace period ended at 2026-01-01T00:00:00Z (its status: "
        "NodeLost: Node gpu-node-7 which was running pod demo-1-x is unresponsive); attempt 2 "
        "starts once it is gone."
    )
    assert "kubectl taint nodes gpu-node-7 node.kubernetes.io/out-of-service" in message
    assert "kubectl delete node gpu-node-7" in message
    assert held.status["phase"] == "Pending"
    assert [t[1] for t in held.transitions] == [Reason.POD_STUCK_TERMINATING]
    # The same observation again: the same status, no second Event.
    again = plan(ftj(held.status), late, stuck_after=60)
    assert again.status["conditions"] == held.status["conditions"]
    assert again.transitions == []
    # The pod gone, the Job goes: the next attempt is made, and Running moves on.
    after = plan(ftj(held.status), Observed(now="2026-01-01T00:02:00Z"), stuck_after=60)
    assert [(a.kind, a.attempt) for a in after.actions] == [("create", 2)]


def test_evaluation_summary_prefers_gated_metric() -> None:
    ev = {"f1": {"before": 0.1, "after": 0.2}, "accuracy": {"before": 0.5, "after": 0.8}}
    assert evaluation_summary(ev, {"accuracy": 0.7}, ["f1", "accuracy"]) == "accuracy 0.5→0.8"
    # Ungated: the first metric the spec lists, whatever order the status's keys come back in.
    assert evaluation_summary(ev, {}, ["accuracy", "f1"]) == "accuracy 0.5→0.8"
    assert evaluation_summary(dict(reversed(ev.items())), {}, ["f1"]) == "f1 0.1→0.2"
    assert evaluation_summary(ev, {}, []) == "accuracy 0.5→0.8"


def test_progress_from_rank0_metrics() -> None:
    text = "\n".join(
        [
            "# TYPE finetune_train_step gauge",
            'finetune_train_step{finetunejob="d",namespace="n",rank="1"} 99',
            'finetune_train_step{finetunejob="d",namespace="n",rank="0"} 20',
            "# TYPE finetune_train_total_steps gauge",
            'finetune_train_total_steps{finetunejob="d",namespace="n",rank="0"} 100',
            "# TYPE finetune_train_loss gauge",
            'finetune_train_loss{finetunejob="d",namespace="n",rank="0"} 1.25',
            "# TYPE finetune_train_epoch gauge",
            'finetune_train_epoch{finetunejob="d",namespace="n",rank="0"} 0.2',
        ]
    )
    values = parse_metrics(text)
    assert values["step"] == 20
    progress = progress_from_metrics(values, {"step": 10, "updatedAt": NOW}, LATER)
    assert progress is not None
    assert progress["percent"] == 20
    assert progress["loss"] == 1.25
    assert progress["etaSeconds"] == 480  # 10 steps/minute, 80 to go
    assert parse_metrics("garbage {{{") == {}


def test_observe_running_finds_rank0_ip() -> None:
    out = observe_job(batch_job(), [pod(1, "Running"), pod(0, "Running")])
    assert out.state is State.RUNNING and out.rank0_ip == "10.0.0.1"


def test_retryable_failure_message_names_the_exit_code_and_log_tail() -> None:
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    pods_ = [pod(0, "Succeeded", 0), pod(1, "Failed", 137, "Traceback...\nOOM")]
    status = derive_status(ftj({"attempts": 1}), observed(job, pods_))
    message = cond(status, "Running")["message"]  # type: ignore[index]
    assert "exit code 137" in message and "OOM" in message


# ---- runPolicy.activeDeadlineSeconds bounds the whole job, not each attempt --------------------

START = "2026-01-01T00:00:00Z"  # status.startTime: the first attempt running


def at(seconds: int) -> str:
    return f"2026-01-01T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"


def test_the_first_attempt_gets_the_whole_deadline() -> None:
    result = plan(ftj(activeDeadlineSeconds=600), observed(None))
    (create,) = result.actions
    assert (create.kind, create.deadline) == ("create", 600)


def test_without_a_deadline_attempts_get_none() -> None:
    (create,) = plan(ftj(), observed(None)).actions
    assert create.deadline is None


def test_a_later_attempt_gets_only_what_is_left() -> None:
    prev = {"attempts": 2, "startTime": START}
    result = plan(ftj(prev, activeDeadlineSeconds=600), Observed(now=at(250)))
    (create,) = result.actions
    assert (create.kind, create.attempt, create.deadline) == ("create", 2, 350)


def test_no_attempt_starts_once_the_budget_is_spent() -> None:
    prev = {"attempts": 2, "startTime": START}
    result = plan(ftj(prev, activeDeadlineSeconds=600), Observed(now=at(600)))
    assert result.actions == []
    assert result.status["phase"] == "Failed"
    assert cond(result.status, "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]


def test_a_job_that_hit_its_deadline_ends_the_finetunejob_with_attempts_left() -> None:
    job = batch_job(cond=("Failed", "DeadlineExceeded", "Job was active longer than specified"))
    prev = {"attempts": 1, "startTime": START}
    result = plan(ftj(prev, activeDeadlineSeconds=600, backoffLimit=5), observed(job, []))
    assert result.actions == []
    assert result.status["phase"] == "Failed"
    failed = cond(result.status, "Failed")
    assert failed["reason"] == "DeadlineExceeded"  # type: ignore[index]
    assert "whole job" in failed["message"]  # type: ignore[index]


def test_a_retryable_failure_after_the_budget_is_spent_is_not_retried() -> None:
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    prev = {"attempts": 1, "startTime": START}
    result = plan(
        ftj(prev, activeDeadlineSeconds=600, backoffLimit=5),
        Observed(now=at(601), job=job, outcome=observe_job(job, [pod(0, "Failed", 1)])),
    )
    assert result.actions == []
    assert cond(result.status, "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]


def test_a_retryable_failure_within_the_budget_restarts() -> None:
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    prev = {"attempts": 1, "startTime": START}
    result = plan(
        ftj(prev, activeDeadlineSeconds=600, backoffLimit=5),
        Observed(now=at(300), job=job, outcome=observe_job(job, [pod(0, "Failed", 1)])),
    )
    assert [a.kind for a in result.actions] == ["delete"]
    assert result.status["attempts"] == 2


def test_a_new_attempts_resume_ends_a_restart_seen_in_the_second_of_the_last_resume() -> None:
    # Status times are whole seconds: attempt 1 reported its resume, and its pod failed, in the
    # second the operator saw both. Attempt 2's resume still ends a restart and is timed.
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    prev = {
        "attempts": 1,
        "startTime": START,
        "progress": {"step": 37, "totalSteps": 100},
        "checkpoints": {"attempt": 1, "resumedFromStep": 0, "lastResumeTime": at(300)},
    }
    failed = plan(
        ftj(prev, backoffLimit=5),
        Observed(now=at(300), job=job, outcome=observe_job(job, [pod(0, "Failed", 137)])),
    )
    assert failed.status["attempts"] == 2
    assert failed.status["checkpoints"]["lastRestartTime"] == at(300)
    second = batch_job(attempt=2)
    resumed = plan(
        ftj({**failed.status, "phase": "Running"}, backoffLimit=5),
        Observed(
            now=at(309),
            job=second,
            outcome=observe_job(second, [pod(0, "Running")]),
            resumed_from_step=30,
            resumed_at=at(307),
        ),
    )
    assert resumed.restart_seconds == 7.0
    ckpt = resumed.status["checkpoints"]
    assert (ckpt["attempt"], ckpt["resumedFromStep"], ckpt["stepsLost"]) == (2, 30, 7)


@pytest.mark.parametrize(
    ("job_clock", "want"),
    [
        # Attempt 1 was created before the job's clock started: the whole budget.
        ({"creationTimestamp": "2025-12-31T23:59:00Z"}, 600),
        # A later attempt, from its creation while the Job controller has not started it.
        ({"creationTimestamp": at(200)}, 400),
        # Its own clock, reset by a resume, wins over its creation.
        ({"creationTimestamp": at(200), "startTime": at(500)}, 100),
        # Nothing left: the minimum, so that the Job controller ends it now.
        ({"creationTimestamp": at(200), "startTime": at(900)}, 1),
    ],
)
def test_the_running_attempt_is_patched_to_end_with_the_whole_budget(job_clock, want) -> None:
    job = batch_job(activeDeadlineSeconds=600)
    job["metadata"]["creationTimestamp"] = job_clock["creationTimestamp"]
    if "startTime" in job_clock:
        job["status"]["startTime"] = job_clock["startTime"]
    prev = {"attempts": 1, "startTime": START}
    result = plan(ftj(prev, activeDeadlineSeconds=600), observed(job, [pod(0, "Running")]))
    patches = [a.patch for a in result.actions if a.kind == "patch"]
    assert patches == ([] if want == 600 else [{"activeDeadlineSeconds": want}])


# ---- a child's name held by something else -----------------------------------------------------


def holder(*refs: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": "demo", "ownerReferences": list(refs)}}


def test_someone_elses_object_fails_the_job_and_says_what_to_do() -> None:
    blocker = name_conflict("Service", holder(), ftj())
    assert (blocker.reason, blocker.permanent) == (Reason.NAME_CONFLICT, True)
    assert "Service demo already exists" in blocker.message
    assert "left untouched" in blocker.message and "Delete or rename" in blocker.message
    result = plan(ftj({"attempts": 1}), Observed(now=NOW, blocker=blocker))
    assert result.actions == []
    assert cond(result.status, "Failed")["reason"] == "NameConflict"  # type: ignore[index]


def test_a_deleted_predecessors_child_is_waited_for() -> None:
    old = {"kind": "FineTuneJob", "name": "demo", "uid": "old-uid", "controller": True}
    blocker = name_conflict("Service", holder(old), ftj())
    assert (blocker.reason, blocker.permanent) == (Reason.NAME_CONFLICT, False)
    assert "garbage collector" in blocker.message
    result = plan(ftj(), Observed(now=NOW, blocker=blocker))
    assert result.actions == []
    assert result.status["phase"] == "Pending"
    assert cond(result.status, "Created")["reason"] == "NameConflict"  # type: ignore[index]


def test_another_kind_of_owner_is_not_a_predecessor() -> None:
    other = {"kind": "Deployment", "name": "demo", "uid": "d-1", "controller": True}
    assert name_conflict("Service", holder(other), ftj()).permanent


def oom_pod(index: int, limit: str | None, where: str = "state") -> dict:
    """A trainer pod whose container the kernel killed for memory."""
    killed = pod(index, "Failed", 137, "Killed")
    term = killed["status"]["containerStatuses"][0].pop("state")["terminated"]
    killed["status"]["containerStatuses"][0][where] = {
        "terminated": {**term, "reason": "OOMKilled"}
    }
    killed["metadata"]["name"] = f"demo-{index}-x"
    resources = {"limits": {"memory": limit}} if limit else {}
    killed["spec"] = {"containers": [{"name": "trainer", "resources": resources}]}
    return killed


@pytest.mark.parametrize("where", ["state", "lastState"])
def test_oom_kill_at_the_limit_fails_for_good_with_the_limit_and_a_hint(where: str) -> None:
    # Rank 0 only saw its peer vanish; the OOM kill of node 1 is the verdict.
    lost_peer = {"status": "Failed", "reason": "TrainingFailed", "message": "Connection closed"}
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    pods_ = [pod(0, "Failed", 1, json.dumps(lost_peer)), oom_pod(1, "8Gi", where)]
    status = derive_status(ftj({"attempts": 1}), observed(job, pods_))
    failed = cond(status, "Failed")
    assert status["phase"] == "Failed" and failed is not None
    assert failed["reason"] == Reason.OOM_KILLED == "OOMKilled"
    assert "demo-1-x" in failed["message"] and "8Gi" in failed["message"]
    assert "limits.memory" in failed["message"] and "batchSizePerDevice" in failed["message"]


def test_oom_kill_without_a_limit_is_the_nodes_and_retried() -> None:
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    result = plan(ftj({"attempts": 1}), observed(job, [pod(0, "Failed", 1), oom_pod(1, None)]))
    assert result.status["phase"] != "Failed" and [a.kind for a in result.actions] == ["delete"]
    restarting = cond(result.status, "Running")
    assert restarting is not None and "OOM-killed with no memory limit" in restarting["message"]


def test_a_permanent_trainer_verdict_stands_over_an_oom_kill() -> None:
    data = {"status": "Failed", "reason": "InvalidDataset", "message": "column 'x' missing"}
    job = batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 3"))
    out = observe_job(job, [pod(0, "Failed", 3, json.dumps(data)), oom_pod(1, "1Gi")])
    assert out.permanent and out.reason == "InvalidDataset"


def test_collective_timeout_restarts_the_gang_with_its_own_reason() -> None:
    hung = {"status": "Failed", "reason": "CollectiveTimeout", "message": "no step after step 7"}
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "limit"))
    pods_ = [pod(0, "Failed", 1, json.dumps(hung)), pod(1, "Running")]
    out = observe_job(job, pods_)
    assert out.state is State.FAILED and not out.permanent
    assert out.reason == Reason.COLLECTIVE_TIMEOUT
    result = plan(ftj({"attempts": 1}), observed(job, pods_))
    assert [a.kind for a in result.actions] == ["delete"] and result.status["attempts"] == 2
    assert "no step after step 7" in cond(result.status, "Running")["message"]  # type: ignore[index]


def test_another_ranks_permanent_verdict_wins_over_rank_0s_lost_peer() -> None:
    lost_peer = {"status": "Failed", "reason": "TrainingFailed", "message": "Connection closed"}
    bad_shard = {"status": "Failed", "reason": "InvalidDataset", "message": "shard 1: no 'text'"}
    bad_shard["rank"] = 1
    job = batch_job(cond=("FailureTarget", "PodFailurePolicy", "exit code 3"))
    pods_ = [pod(0, "Failed", 1, json.dumps(lost_peer)), pod(1, "Failed", 3, json.dumps(bad_shard))]
    out = observe_job(job, pods_)
    assert out.permanent and out.reason == "InvalidDataset"
    assert "shard 1" in out.message


def test_a_restart_says_what_failed_not_the_attempt_jobs_backoff_limit() -> None:
    job = batch_job(cond=("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit"))
    crashed = {"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error: boom"}
    result = plan(ftj({"attempts": 1}), observed(job, [pod(0, "Failed", 1, json.dumps(crashed))]))
    running = cond(result.status, "Running")
    assert running is not None and "CUDA error: boom" in running["message"]
    assert "BackoffLimitExceeded" not in running["message"]


# ---- disruptions do not count against backoffLimit -------------------------------------------

INTERRUPTED = json.dumps(
    {"status": "Failed", "reason": "Interrupted", "message": "stopped by SIGTERM at step 7"}
)
CRASHED = json.dumps({"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error"})
FAILED_JOB = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


def ended(index: int, exit_code: int, message: str = "", at: str = NOW, **conds: Any) -> dict:
    """A trainer pod that exited at `at`, with pod conditions given as type=(status, reason)."""
    p = pod(index, "Failed", exit_code, message)
    p["metadata"]["name"] = f"demo-{index}-abcde"
    p["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = at
    p["status"]["conditions"] = [
        {"type": t, "status": s, "reason": r, "message": f"{r} happened", "lastTransitionTime": at}
        for t, (s, r) in conds.items()
    ]
    return p


def evicted(index: int, at: str = NOW, message: str = "") -> dict:
    return ended(index, 1, message, at, DisruptionTarget=("True", "EvictionByEvictionAPI"))


def restart_of(previous: dict, attempt: int, pods_: list[dict], limit: int) -> Any:
    """The plan for attempt `attempt` ending as `pods_` show, after `previous` status."""
    job = batch_job(attempt=attempt, cond=FAILED_JOB)
    return plan(ftj(previous, backoffLimit=limit), observed(job, pods_))


def test_an_evicted_pod_restarts_the_gang_without_spending_the_backoff_limit() -> None:
    # Rank 1 evicted (the Job's podFailurePolicy ignores it); rank 0 then exits without a result.
    pods_ = [ended(0, 1, at=LATER), evicted(1, at=NOW)]
    result = restart_of({"attempts": 1}, 1, pods_, limit=0)
    assert [a.kind for a in result.actions] == ["delete"]
    assert result.status["attempts"] == 2 and result.status["disruptions"] == 1
    running = cond(result.status, "Running")
    assert running is not None and running["reason"] == "Restarting"
    assert "pod demo-1-abcde was disrupted (EvictionByEvictionAPI" in running["message"]
    assert "does not count against runPolicy.backoffLimit" in running["message"]
    assert result.status["phase"] == "Pending"


def evicted_by_its_kubelet(index: int, message: str, **conds: Any) -> dict:
    """A pod its kubelet evicted (status.reason Evicted, its message), the container killed
    first: the other ranks stop after it."""
    p = ended(index, 137, at=NOW, **conds)
    p["status"].update(reason="Evicted", message=message)
    return p


CACHE_FULL = 'Usage of EmptyDir volume "tmp" exceeds the limit "20Gi". '
CONTAINER_FULL = 'Container trainer exceeded its local ephemeral storage limit "30Gi". '


@pytest.mark.parametrize(
    ("said", "field"),
    [(CACHE_FULL, "spec.template.cacheSize"), (CONTAINER_FULL, "spec.resources.limits")],
    ids=["cache-volume", "container-limit"],
)
def test_a_pod_evicted_for_its_local_storage_fails_the_job_at_once(said: str, field: str) -> None:
    # The same download or artifact fills the same volume again: no other attempt.
    pods_ = [ended(0, 1, at=LATER), evicted_by_its_kubelet(1, said)]
    result = restart_of({"attempts": 1}, 1, pods_, limit=3)
    assert result.actions == [] and result.status["attempts"] == 1
    failed = cond(result.status, "Failed")
    assert result.status["phase"] == "Failed" and failed is not None
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(f"{field}: the kubelet evicted pod demo-1-abcde: {said}")


def test_a_pod_evicted_for_its_cache_that_saved_on_sigterm_fails_the_job_and_its_job_goes() -> None:
    # The kubelet's eviction SIGTERMs the container first: a trainer that saves in time exits
    # 143 (Interrupted), which the Job ignores and replaces, so the Job itself never fails.
    interrupted = json.dumps({"status": "Failed", "reason": "Interrupted", "message": "SIGTERM"})
    gone = evicted_by_its_kubelet(1, CACHE_FULL)
    gone["status"]["containerStatuses"][0]["state"]["terminated"].update(
        exitCode=143, message=interrupted
    )
    pods_ = [pod(0, "Running"), gone, pod(1, "Pending")]
    result = plan(ftj({"attempts": 1}, backoffLimit=3), observed(batch_job(), pods_))
    assert [(a.kind, a.uid) for a in result.actions] == [("delete", "job-1")]
    failed = cond(result.status, "Failed")
    assert result.status["phase"] == "Failed" and failed is not None
    assert failed["reason"] == "InvalidSpec" and result.status["attempts"] == 1
    assert failed["message"].startswith("spec.template.cacheSize: the kubelet evicted pod demo-1")
    assert result.status.get("disruptions", 0) == 0


@pytest.mark.parametrize(
    ("said", "conds"),
    [
        # Another emptyDir than the cache: not a field of the spec's to name.
        ('Usage of EmptyDir volume "scratch" exceeds the limit "1Gi". ', {}),
        # Node pressure: the node's disk, not this job's; a disruption, as any eviction.
        (
            "The node was low on resource: ephemeral-storage. ",
            {"DisruptionTarget": ("True", "TerminationByKubelet")},
        ),
    ],
    ids=["other-volume", "node-pressure"],
)
def test_other_kubelet_evictions_restart_the_gang(said: str, conds: dict) -> None:
    pods_ = [ended(0, 1, at=LATER), evicted_by_its_kubelet(1, said, **conds)]
    result = restart_of({"attempts": 1}, 1, pods_, limit=3)
    assert [a.kind for a in result.actions] == ["delete"] and result.status["attempts"] == 2
    assert result.status.get("disruptions", 0) == (1 if conds else 0)


def test_an_interrupted_trainer_restarts_with_backoff_limit_0_and_counts_a_disruption() -> None:
    # `kubectl delete pod`: no DisruptionTarget, but the gang saved and stopped with Interrupted.
    pods_ = [ended(0, 1, INTERRUPTED, at=NOW), ended(1, 1, INTERRUPTED, at=NOW)]
    out = observe_job(batch_job(attempt=2, cond=FAILED_JOB), pods_)
    assert out.state is State.FAILED and not out.permanent and out.reason == "Interrupted"
    result = restart_of({"attempts": 2, "disruptions": 1}, 2, pods_, limit=0)
    assert result.status["attempts"] == 3 and result.status["disruptions"] == 2
    message = cond(result.status, "Running")["message"]  # type: ignore[index]
    assert "attempt 2 was disrupted" in message and "stopped by SIGTERM at step 7" in message


def test_an_ordinary_failure_still_fails_at_the_limit() -> None:
    crash = [ended(0, 1, CRASHED)]
    # 3 attempts, 1 of them disrupted: 2 failures, one more than backoffLimit 1 allows.
    result = restart_of({"attempts": 3, "disruptions": 1}, 3, crash, limit=1)
    failed = cond(result.status, "Failed")
    assert result.status["phase"] == "Failed" and result.actions == []
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"].startswith("2 attempt(s) failed (and 1 disrupted")
    assert result.status["disruptions"] == 1
    # Without that disruption the same failure is the first one counted: a restart.
    again = restart_of({"attempts": 2, "disruptions": 1}, 2, crash, limit=1)
    assert again.status["attempts"] == 3 and again.status["disruptions"] == 1
    assert "disrupted" not in cond(again.status, "Running")["message"]  # type: ignore[index]
    # And with backoffLimit 0 the first ordinary failure ends the job, as before.
    first = restart_of({"attempts": 1}, 1, crash, limit=0)
    assert cond(first.status, "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]


def test_disruptions_and_failures_mixed_over_the_attempts() -> None:
    # backoffLimit 1: eviction, crash (the one failure allowed), SIGTERM, crash (one too many).
    # Each attempt ends after the restart that began it (the plans run at NOW).
    hour = "2026-01-01T01:00:00Z"
    endings = [
        [ended(0, 1, INTERRUPTED, at=LATER), evicted(1)],
        [ended(0, 1, CRASHED, at=hour)],
        [ended(0, 1, INTERRUPTED, at=hour), ended(1, 1, INTERRUPTED, at=hour)],
        [ended(0, 137, at=hour)],
    ]
    status: dict[str, Any] = {"attempts": 1}
    seen = []
    for attempt, pods_ in enumerate(endings, start=1):
        result = restart_of(status, attempt, pods_, limit=1)
        status = result.status
        seen.append((status["phase"], status["attempts"], status.get("disruptions", 0)))
    assert seen == [
        ("Pending", 2, 1),
        ("Pending", 3, 1),
        ("Pending", 4, 2),
        ("Failed", 4, 2),
    ]
    assert cond(status, "Failed")["message"].startswith("2 attempt(s) failed")  # type: ignore[index]


@pytest.mark.parametrize("crash_at", [NOW, ""], ids=["same-second", "unknown-time"])
def test_sigterm_after_a_crash_is_not_a_disruption(crash_at: str) -> None:
    # Rank 1 crashed; the Job controller then stopped rank 0, which saved and said Interrupted.
    # The first pod to stop decides, and a tie (or a time not known) goes to the crash.
    for pods_ in (
        [ended(0, 1, INTERRUPTED, at=LATER), ended(1, 1, CRASHED, at=NOW)],
        [ended(0, 1, INTERRUPTED, at=NOW), ended(1, 1, CRASHED, at=crash_at)],
    ):
        out = observe_job(batch_job(cond=FAILED_JOB), pods_)
        assert out.disruption == ""
        result = restart_of({"attempts": 1}, 1, pods_, limit=0)
        assert result.status["phase"] == "Failed"
        assert result.status["disruptions"] == 0
        # The message names the crash, not the rank that was only stopped after it.
        assert cond(result.status, "Failed")["message"].endswith("last: CUDA error")  # type: ignore[index]


# ---- a node lost under the gang ---------------------------------------------------------------

HUNG = json.dumps({"status": "Failed", "reason": "CollectiveTimeout", "message": "no step after 7"})


def on_node(index: int, node: str = "n1") -> dict:
    """A pod still running (as far as the API knows) on `node`: it never reported its end."""
    p = pod(index, "Running")
    p["metadata"]["name"] = f"demo-{index}-abcde"
    p["spec"] = {"nodeName": node}
    return p


def node(status: str, at: str = NOW) -> dict:
    reason = {"True": "KubeletReady", "Unknown": "NodeStatusUnknown"}.get(status, "KubeletNotReady")
    ready = {"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": at}
    ready["message"] = "Kubelet stopped posting node status." if status == "Unknown" else "ok"
    return {"metadata": {"name": "n1"}, "status": {"conditions": [ready]}}


def failed_at(at: str) -> dict:
    job = batch_job(cond=FAILED_JOB)
    job["status"]["conditions"][0]["lastTransitionTime"] = at
    return job


def marked(index: int, node_: str = "n1") -> dict:
    """A running pod that the node lifecycle controller marked not ready (its node is silent)."""
    p = on_node(index, node_)
    p["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    return p


def test_nodes_are_read_only_for_silent_pods_of_a_failed_attempt_or_marked_running_ones() -> None:
    pods_ = [ended(0, 1, HUNG), on_node(1), pod(2, "Pending")]
    assert nodes_to_read(failed_at(NOW), pods_) == {"n1"}
    assert nodes_to_read(batch_job(), pods_) == set()  # running and ready: no Node is read
    assert nodes_to_read(batch_job(), [on_node(0, "n0"), marked(1)]) == {"n1"}
    assert nodes_to_read(failed_at(NOW), [ended(0, 1, HUNG), ended(1, 1, HUNG)]) == set()


def test_a_running_pods_node_not_ready_shows_in_running_and_clears_when_it_answers() -> None:
    job, pods_ = batch_job(), [on_node(0, "n0"), marked(1)]
    out = observe_job(job, pods_, nodes={"n1": node("Unknown", at=NOW)})
    assert out.state is State.RUNNING
    said = "Ready=Unknown, NodeStatusUnknown: Kubelet stopped posting node status."
    assert out.node_not_ready == LostNode(
        "n1", f"node n1 of pod demo-1-abcde is not ready ({said})", NOW
    )
    result = plan(ftj({"attempts": 1}), Observed(now=LATER, job=job, outcome=out))
    running = cond(result.status, "Running")
    assert running is not None and running["status"] == "False"
    assert running["reason"] == "NodeNotReady" and result.actions == []
    assert running["message"].startswith(
        f"node n1 of pod demo-1-abcde is not ready ({said}) since {NOW}: the control plane no"
    )
    assert "kubectl taint nodes n1 node.kubernetes.io/out-of-service" in running["message"]
    assert result.status["attempts"] == 1 and not result.status.get("disruptions")
    # The node answers again: its pods are ready, and the gang runs.
    back = observe_job(job, [on_node(0, "n0"), on_node(1)], nodes={})
    again = plan(ftj(result.status), Observed(now=LATER, job=job, outcome=back))
    assert cond(again.status, "Running")["reason"] == "PodsRunning"  # type: ignore[index]


@pytest.mark.parametrize(
    ("found", "said"),
    [
        (node("Unknown", at=LATER), "is not ready (Ready=Unknown, NodeStatusUnknown: Kubelet"),
        (node("False"), "is not ready (Ready=False, KubeletNotReady: ok)"),
        (None, "was deleted"),
    ],
    ids=["unknown", "not-ready", "deleted"],
)
def test_ranks_that_timed_out_on_a_lost_nodes_pod_restart_as_a_disruption(
    found: dict | None, said: str
) -> None:
    # Rank 0 gave up (at NOW) before the node was marked (LATER): still the node's doing.
    pods_ = [ended(0, 1, HUNG, at=NOW), on_node(1)]
    out = observe_job(failed_at(NOW), pods_, nodes={"n1": found})
    assert out.disruption.startswith(f"node n1 of pod demo-1-abcde {said}")
    assert out.unheard == ""
    observed_ = Observed(now=NOW, job=failed_at(NOW), outcome=out)
    result = plan(ftj({"attempts": 1}, backoffLimit=0), observed_)
    assert [a.kind for a in result.actions] == ["delete"]
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)


def test_a_crash_before_the_node_was_lost_is_still_a_failure() -> None:
    pods_ = [ended(0, 1, CRASHED, at=NOW), on_node(1)]
    out = observe_job(failed_at(NOW), pods_, nodes={"n1": node("Unknown", at=LATER)})
    assert out.disruption == "" and out.reason == "TrainingFailed"
    # A node deleted at a time not known: the crash may have come first, and counts.
    out = observe_job(failed_at(NOW), pods_, nodes={"n1": None})
    assert out.disruption == "" and out.reason == "TrainingFailed"
    # Rank 0 timed out on rank 1 after rank 2 crashed: counted, and with rank 1's node known
    # lost there is nothing to wait for.
    hung_after_crash = [ended(0, 1, HUNG, at=LATER), on_node(1), ended(2, 1, CRASHED, at=NOW)]
    out = observe_job(failed_at(LATER), hung_after_crash, nodes={"n1": node("Unknown", LATER)})
    assert (out.reason, out.disruption, out.unheard) == ("CollectiveTimeout", "", "")
    # A crash after the node was marked is the node's doing.
    late = [ended(0, 1, CRASHED, at=LATER), on_node(1)]
    out = observe_job(failed_at(LATER), late, nodes={"n1": node("Unknown", at=NOW)})
    assert out.disruption.startswith("node n1 of pod demo-1-abcde is not ready")


def evicted_by_the_taint_manager(index: int, node_: str = "n1") -> dict:
    """A pod on a node marked unreachable, once its toleration of that ran out: the taint
    eviction controller marked it DisruptionTarget and deleted it, and no kubelet confirms the
    stop, so it stays Running (as far as the API knows) with a deletionTimestamp."""
    p = marked(index, node_)
    p["metadata"]["deletionTimestamp"] = at_offset(390)
    p["metadata"]["deletionGracePeriodSeconds"] = 30
    target = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    target["message"] = "Taint manager: deleting due to NoExecute taint"
    p["status"]["conditions"].append({**target, "lastTransitionTime": at_offset(360)})
    return p


def test_a_pod_evicted_from_a_lost_node_restarts_the_gang_as_a_new_attempt() -> None:
    """Its rank went with the node before the gang could save, and the Job replaces a pod only
    once it is terminal: an in-place restart would wait for a replacement that never comes,
    while the other ranks wait in whatever they were doing (a load, a save, a push: not timed)
    until torch's collective timeout."""
    job = started_job()
    pods_ = [on_node(0, "n0"), evicted_by_the_taint_manager(1)]
    lost = observe_job(job, pods_, nodes={"n1": node("Unknown")})
    assert lost.leaving is not None and lost.leaving.terminating
    assert lost.leaving.lost.startswith("node n1 of pod demo-1-abcde is not ready (Ready=Unknown")
    result = plan(ftj(RUNNING_GANG), Observed(now=at_offset(361), job=job, outcome=lost))
    assert [(a.kind, a.attempt) for a in result.actions] == [("delete", 1)] and result.restarted
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)
    running = cond(result.status, "Running")
    assert running is not None and running["reason"] == "Restarting"
    assert running["message"].startswith(
        "pod demo-1-abcde was disrupted (DeletionByTaintManager: Taint manager: deleting due to "
        "NoExecute taint): node n1 of pod demo-1-abcde is not ready (Ready=Unknown"
    ), running["message"]
    assert "the gang restarts as attempt 2, from its last checkpoint" in running["message"]
    # The same eviction with the node not read (or read Ready, as in a drain): the gang saved,
    # and the Job replaces the pod in place.
    for nodes in ({}, {"n1": node("True")}):
        drained = observe_job(job, pods_, nodes=nodes)
        assert drained.leaving is not None and drained.leaving.lost == ""
        in_place = plan(ftj(RUNNING_GANG), Observed(now=at_offset(361), job=job, outcome=drained))
        assert in_place.actions == [] and in_place.status["attempts"] == 1
        assert "rejoins it in place" in cond(in_place.status, "Running")["message"]  # type: ignore[index]


def test_a_pod_the_pod_garbage_collector_removed_with_its_node_restarts_the_gang() -> None:
    """A deleted node's pods are marked Failed (DisruptionTarget, DeletionByPodGC) and removed
    at once: the Job replaces such a pod, but its rank left without the gang saving."""
    job = started_job()
    gc = on_node(1)  # no kubelet reported its container's end: only the phase is set
    gc["status"]["phase"] = "Failed"
    target = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"}
    target["message"] = "PodGC: node no longer exists"
    gc["status"]["conditions"] = [{**target, "lastTransitionTime": at_offset(100)}]
    out = observe_job(job, [on_node(0, "n0"), gc])
    assert out.leaving is not None and out.leaving.lost == "node n1 of pod demo-1-abcde is gone"
    result = plan(ftj(RUNNING_GANG), Observed(now=at_offset(101), job=job, outcome=out))
    assert [a.kind for a in result.actions] == ["delete"]
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)
    assert cond(result.status, "Running")["message"].startswith(  # type: ignore[index]
        "pod demo-1-abcde was disrupted (DeletionByPodGC: PodGC: node no longer exists): node "
        "n1 of pod demo-1-abcde is gone: its rank stopped before the gang could save, so the "
        "others cannot rejoin a replacement in place; the gang restarts as attempt 2, from its "
        "last checkpoint"
    )


def made_at(index: int, seconds: int, suffix: str = "abcde") -> dict:
    p = on_node(index, f"n{index}")
    p["metadata"]["name"] = f"demo-{index}-{suffix}"
    p["metadata"]["creationTimestamp"] = at_offset(seconds)
    return p


def formed_at(seconds: int) -> dict[str, float]:
    """Rank 0's phase stamps: its gang formed `seconds` after NOW."""
    return {"rendezvous": datetime(2026, 1, 1, tzinfo=UTC).timestamp() + seconds}


def test_a_pod_made_after_the_gang_formed_replaces_one_that_left_unseen() -> None:
    """The removed pod can be gone before any pass lists it: the Job's replacement, made after
    rank 0's gang formed beside a member it formed with, says that a member left."""
    job = started_job()
    pods_ = [made_at(0, 0), made_at(1, 300, "fghij")]
    out = observe_job(job, pods_)
    assert out.leaving is None and out.made["demo-1-fghij"] == at_offset(300)
    seen = Observed(now=at_offset(301), job=job, outcome=out, stamps=formed_at(20))
    result = plan(ftj(RUNNING_GANG), seen)
    assert [(a.kind, a.attempt) for a in result.actions] == [("delete", 1)] and result.restarted
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)
    assert result.status["checkpoints"]["lastRestartTime"] == at_offset(300)
    message = cond(result.status, "Running")["message"]  # type: ignore[index]
    assert message.startswith(
        f"pod demo-1-fghij was made at {at_offset(300)}, after the gang formed at "
        f"{at_offset(20)}: the pod it replaces went without the gang stopping with it (removed "
        "with its node by the pod garbage collector, or force-deleted): its rank stopped"
    ), message
    # Not a replacement: no stamp (not scraped this pass, or rank 0's own pod is new); a pod
    # made within the clocks' skew of the formation; every pod made after it (a new gang, as
    # after a resume); a restart recorded since the gang formed (its replacement is expected).
    restarted = {**RUNNING_GANG, "checkpoints": {"lastRestartTime": at_offset(200)}}
    for stamps, listed, previous in (
        ({}, pods_, RUNNING_GANG),
        (formed_at(295), pods_, RUNNING_GANG),
        (formed_at(20), [made_at(0, 30), made_at(1, 300)], RUNNING_GANG),
        (formed_at(20), pods_, restarted),
    ):
        calm = Observed(
            now=at_offset(301), job=job, outcome=observe_job(job, listed), stamps=stamps
        )
        quiet = plan(ftj(previous), calm)
        assert quiet.actions == [] and quiet.status["attempts"] == 1, (stamps, listed)


def test_a_failure_after_a_member_left_unseen_is_a_disruption() -> None:
    """The operator away: rank 1's pod removed with its node, the Job's replacement made, and
    rank 0 gave up waiting for rank 1 (CollectiveTimeout) before any pass saw either. Its
    result's rendezvous stamp dates the gang, and the replacement came after it: a disruption,
    which backoffLimit 0 does not end."""
    hung = {"status": "Failed", "reason": "CollectiveTimeout", "message": "no step after 7"}
    rank0 = made_at(0, 0)
    rank0["status"] = ended(0, 1, json.dumps({**hung, "phases": formed_at(20)}))["status"]
    pods_ = [rank0, made_at(1, 300, "fghij")]
    out = observe_job(failed_at(at_offset(310)), pods_)
    assert (out.reason, out.disruption) == ("CollectiveTimeout", "")
    seen = Observed(now=at_offset(311), job=failed_at(at_offset(310)), outcome=out)
    result = plan(ftj(RUNNING_GANG, backoffLimit=0), seen)
    assert [a.kind for a in result.actions] == ["delete"] and result.restarted
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)
    message = cond(result.status, "Running")["message"]  # type: ignore[index]
    assert message.startswith(
        f"attempt 1 was disrupted (pod demo-1-fghij was made at {at_offset(300)}, after the "
        f"gang formed at {at_offset(20)}; the pod it replaces went without the gang stopping"
    ), message
    # The Job deleted the replacement as it failed, before a pass listed it: its Event dates it.
    created = {
        "reason": "SuccessfulCreate",
        "involvedObject": {"kind": "Job", "uid": "job-1"},
        "message": "Created pod: demo-1-fghij",
        "firstTimestamp": at_offset(300),
    }
    job = failed_at(at_offset(310))
    assert needs_created_events(job, finished=False) and not needs_created_events(job, True)
    gone = observe_job(job, [rank0], [created, {**created, "involvedObject": {"uid": "job-0"}}])
    assert gone.made == {"demo-0-abcde": at_offset(0), "demo-1-fghij": at_offset(300)}
    seen = Observed(now=at_offset(311), job=job, outcome=gone)
    assert plan(ftj(RUNNING_GANG, backoffLimit=0), seen).status["disruptions"] == 1
    # Counted, once the wait for the silent replacement is over: a gang that re-formed with the
    # replacement (a later stamp: an in-place rejoin), a result without the stamp (a rank 0 that
    # failed before its gang formed), another rank's result, a restart since the gang formed.
    restarted = {**RUNNING_GANG, "checkpoints": {"lastRestartTime": at_offset(200)}}
    for result_, previous in (
        ({**hung, "phases": formed_at(305)}, RUNNING_GANG),
        (hung, RUNNING_GANG),
        ({**hung, "rank": 1, "phases": formed_at(20)}, RUNNING_GANG),
        ({**hung, "phases": formed_at(20)}, restarted),
    ):
        rank0["status"] = ended(0, 1, json.dumps(result_))["status"]
        failed = observe_job(failed_at(at_offset(310)), [rank0, made_at(1, 300, "fghij")])
        seen = Observed(now=at_offset(371), job=failed_at(at_offset(310)), outcome=failed)
        counted = plan(ftj(previous, backoffLimit=0), seen)
        assert counted.actions == [], result_
        assert cond(counted.status, "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]


def stamped(seconds: int, *phases_: str) -> dict[str, float]:
    """Rank 0's phase stamps, each `seconds` after NOW."""
    return {phase: datetime(2026, 1, 1, tzinfo=UTC).timestamp() + seconds for phase in phases_}


def test_rank_0s_replacement_that_waits_past_the_hang_timeout_for_its_gang_restarts_it() -> None:
    """Rank 0's own pod removed unseen: its replacement's process (started at +305 s) waits for
    members that stay in the old gang's collectives. Members that saved with the old rank 0
    would have rejoined within seconds; past the hang timeout (60 s, and 10 s for the clocks),
    the gang restarts."""
    job = started_job()
    pods_ = [made_at(0, 300, "fghij"), made_at(1, 0)]
    out = observe_job(job, pods_)
    assert out.rank0_pod == "demo-0-fghij"
    waiting = stamped(305, "process_started")

    def planned(now: int, stamps: dict[str, float], previous: dict = RUNNING_GANG) -> Any:
        seen = Observed(now=at_offset(now), job=job, outcome=out, stamps=stamps)
        return plan(ftj(previous), seen)

    result = planned(400, waiting)
    assert [a.kind for a in result.actions] == ["delete"]
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)
    assert cond(result.status, "Running")["message"].startswith(  # type: ignore[index]
        f"pod demo-0-fghij (rank 0) was made at {at_offset(300)}, after the rest of the gang, and "
        "has waited 95 s for it to form: the pod it replaces went without the gang stopping"
    )
    # Not yet past the hang timeout; formed (with the replacement: a rejoin); a restart
    # recorded since the gang's pods were made (a stop some pass saw); no stamps (not scraped).
    restarted = {**RUNNING_GANG, "checkpoints": {"lastRestartTime": at_offset(250)}}
    for now, stamps, previous in (
        (370, waiting, RUNNING_GANG),
        (400, {**waiting, **stamped(310, "rendezvous")}, RUNNING_GANG),
        (400, waiting, restarted),
        (400, {}, RUNNING_GANG),
    ):
        quiet = planned(now, stamps, previous)
        assert quiet.actions == [] and quiet.status["attempts"] == 1, (now, stamps, previous)
    # A member not started yet (pending): rank 0 waits for it.
    pending = [made_at(0, 300, "fghij"), made_at(1, 0)]
    pending[1]["status"]["phase"] = "Pending"
    slow = Observed(now=at_offset(400), job=job, outcome=observe_job(job, pending), stamps=waiting)
    assert plan(ftj(RUNNING_GANG), slow).actions == []
    # Made with the rest of the gang: its first forming, however long it waits.
    first = observe_job(job, [made_at(0, 3, "fghij"), made_at(1, 0)])
    seen = Observed(
        now=at_offset(900), job=job, outcome=first, stamps=stamped(5, "process_started")
    )
    assert plan(ftj(RUNNING_GANG), seen).actions == []


def test_a_silent_pod_is_waited_for_then_counted_if_its_node_stays_ready() -> None:
    job, pods_ = failed_at(NOW), [ended(0, 1, HUNG), on_node(1)]
    policy = ftj({"attempts": 1}, backoffLimit=0)
    for nodes in ({}, {"n1": node("True")}):  # not readable, or ready
        out = observe_job(job, pods_, nodes=nodes)
        assert out.unheard == "pod demo-1-abcde on node n1" and out.disruption == ""
        waiting = plan(policy, Observed(now=at_offset(20), job=job, outcome=out))
        assert waiting.actions == [] and waiting.requeue_after == 40
        assert waiting.status["attempts"] == 1 and waiting.status["phase"] != "Failed"
        running = cond(waiting.status, "Running")
        assert running is not None and running["reason"] == "Restarting"
        assert "pod demo-1-abcde on node n1 has not reported its end" in running["message"]
        # The wait is over: the failure counts, and backoffLimit 0 ends the job.
        done = plan(policy, Observed(now=at_offset(60), job=job, outcome=out), node_lost_wait=60)
        assert done.status["phase"] == "Failed" and done.status.get("disruptions", 0) == 0
    # A hung rank's pod stops (the Job controller's SIGTERM): no wait, counted at once.
    stopped = [ended(0, 1, HUNG), ended(1, 143)]
    assert observe_job(job, stopped, nodes={}).unheard == ""


def test_an_oom_kill_at_the_limit_stays_permanent_despite_an_eviction() -> None:
    pods_ = [oom_pod(0, "1Gi"), evicted(1, at=LATER)]
    out = observe_job(batch_job(cond=FAILED_JOB), pods_)
    assert out.permanent and out.reason == "OOMKilled" and out.disruption == ""


def test_a_suspended_job_is_not_a_failure() -> None:
    """runPolicy.suspend: the Job controller deletes the pods without counting them (it removes
    their tracking finalizers first), so the Job never fails; the trainers still write
    Interrupted on their way out. Neither an attempt nor a disruption is spent."""
    job = batch_job(suspend=True)
    job["status"]["conditions"] = [
        {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": ""}
    ]
    pods_ = [ended(0, 1, INTERRUPTED), ended(1, 1, INTERRUPTED)]
    result = plan(ftj({"attempts": 1}, suspend=True), observed(job, pods_))
    assert result.actions == []
    assert result.status["phase"] == "Suspended"
    assert result.status["attempts"] == 1 and result.status["disruptions"] == 0
    assert result.requeue_after is None
    # Resumed: the same attempt goes on.
    resumed = plan(ftj(result.status), observed(batch_job(), [pod(0, "Pending")]))
    assert resumed.actions == [] and resumed.status["attempts"] == 1


# ---- pods that cannot start say why, and end the job after pendingTimeoutSeconds ------------


def at_offset(seconds: int) -> str:
    return (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def started_job(started: str = NOW, **spec: Any) -> dict:
    job = batch_job(parallelism=2, **spec)
    job["metadata"]["creationTimestamp"] = started
    job["status"]["startTime"] = started
    return job


def waiting_pod(index: int, reason: str, message: str = "") -> dict:
    p = pod(index, "Pending")
    p["metadata"]["name"] = f"demo-{index}-abcde"
    waiting = {"reason": reason, **({"message": message} if message else {})}
    p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    return p


def unschedulable_pod(index: int, message: str, phase: str = "Pending") -> dict:
    p = pod(index, phase)
    p["metadata"]["name"] = f"demo-{index}-abcde"
    p["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    ]
    return p


def pending_plan(pods_: list[dict], now: str = NOW, status: dict | None = None, **kw: Any):
    job = started_job()
    return plan(
        ftj(status or {"attempts": 1}, **kw),
        Observed(now=now, job=job, outcome=observe_job(job, pods_)),
    )


PULL_MESSAGE = 'Back-off pulling image "ghcr.io/org/trainer:nope"'


def test_an_image_pull_back_off_shows_at_once_with_the_pods_reason() -> None:
    result = pending_plan([waiting_pod(0, "ImagePullBackOff", PULL_MESSAGE), pod(1, "Pending")])
    running = cond(result.status, "Running")
    assert running is not None and running["status"] == "False"
    assert running["reason"] == "ImagePullBackOff"
    assert running["message"] == f"pod demo-0-abcde: {PULL_MESSAGE}"
    assert result.status["phase"] == "Pending" and result.actions == []
    # Looked at again when its time is up, a second late so that it is.
    assert result.requeue_after == 601
    assert ("NotRunning", "ImagePullBackOff", running["message"]) in result.transitions


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        ("ErrImagePull", "ImagePullBackOff"),  # the kubelet alternates the two: no flapping
        ("InvalidImageName", "InvalidImageName"),
        ("CreateContainerConfigError", "CreateContainerConfigError"),
        ("CreateContainerError", "CreateContainerError"),
    ],
)
def test_each_container_waiting_reason_is_shown(reason: str, shown: str) -> None:
    result = pending_plan([waiting_pod(1, reason, 'secret "hf" not found'), pod(0, "Pending")])
    assert cond(result.status, "Running")["reason"] == shown  # type: ignore[index]


def test_an_unschedulable_pod_names_what_the_scheduler_said() -> None:
    said = '0/3 nodes are available: persistentvolumeclaim "data" not found.'
    result = pending_plan([unschedulable_pod(0, said), unschedulable_pod(1, said)])
    running = cond(result.status, "Running")
    assert running is not None and running["reason"] == "Unschedulable"
    assert running["message"] == f"pod demo-0-abcde: {said}"


def test_slow_pods_never_time_out_and_their_own_changes_bring_the_next_look() -> None:
    creating = waiting_pod(0, "ContainerCreating")
    result = pending_plan([creating, pod(1, "Pending")], now=at_offset(3600))
    assert cond(result.status, "Running") is None and result.status["phase"] == "Pending"
    # Both made: a pod that gets stuck changes, and its watch event brings the next pass.
    assert result.requeue_after is None
    # Running pods need no second look; a pod the scheduler still reports (as no kubelet bound
    # it, in tests) is not stuck once it runs.
    running = unschedulable_pod(1, "no nodes available", phase="Running")
    done = pending_plan([pod(0, "Running"), running])
    assert cond(done.status, "Running")["reason"] == "PodsRunning"  # type: ignore[index]
    assert done.requeue_after is None


def test_a_stuck_pod_fails_the_job_once_pending_timeout_seconds_are_up() -> None:
    pods_ = [waiting_pod(0, "ImagePullBackOff", PULL_MESSAGE), pod(1, "Pending")]
    before = pending_plan(pods_, now=at_offset(599))
    assert before.status["phase"] == "Pending" and before.requeue_after == 2
    result = pending_plan(pods_, now=at_offset(600), status=before.status)
    failed = cond(result.status, "Failed")
    assert result.status["phase"] == "Failed" and failed is not None
    assert failed["reason"] == "PendingTimeout"
    message = failed["message"]
    assert message.startswith("ImagePullBackOff for longer than runPolicy.pendingTimeoutSeconds")
    assert f"pod demo-0-abcde: {PULL_MESSAGE}" in message
    assert "spec.template.image" in message  # what to fix
    # Its Job goes, so that its pods free what they hold and never train for a Failed job.
    assert [(a.kind, a.uid) for a in result.actions] == [("delete", "job-1")]
    assert result.requeue_after is None
    # Finished for good: the next pass (the Job being deleted) changes nothing.
    again = plan(ftj(result.status), observed(None))
    assert again.actions == [] and again.status == result.status


def test_pending_timeout_seconds_is_read_from_the_spec() -> None:
    pods_ = [unschedulable_pod(0, "no nodes available to schedule pods")]
    assert pending_plan(pods_, now=at_offset(45), pendingTimeoutSeconds=60).requeue_after == 16
    late = pending_plan(pods_, now=at_offset(60), pendingTimeoutSeconds=60)
    failed = cond(late.status, "Failed")
    assert failed is not None and failed["reason"] == "PendingTimeout"
    assert "(60 s; 60 s since the attempt's Job started)" in failed["message"]


def test_the_clock_starts_with_the_attempts_job_not_the_finetunejob() -> None:
    # A Job resumed (or admitted by Kueue) at 1000 s: its startTime was reset then.
    job = started_job(at_offset(1000))
    job["metadata"]["creationTimestamp"] = NOW
    pods_ = [waiting_pod(0, "ImagePullBackOff", PULL_MESSAGE)]
    result = plan(
        ftj({"attempts": 1}),
        Observed(now=at_offset(1300), job=job, outcome=observe_job(job, pods_)),
    )
    assert result.status["phase"] == "Pending" and result.requeue_after == 301


def test_a_partial_gang_with_a_stuck_pod_is_not_running() -> None:
    said = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    result = pending_plan([pod(0, "Running"), unschedulable_pod(1, said)])
    running = cond(result.status, "Running")
    assert running is not None and running["reason"] == "Unschedulable"
    assert result.status["phase"] == "Pending"
    assert result.status["startTime"] == NOW  # the deadline's clock runs all the same


def test_a_suspended_job_never_times_out() -> None:
    job = started_job(suspend=True)
    pods_ = [waiting_pod(0, "ImagePullBackOff")]
    result = plan(
        ftj({"attempts": 1}, suspend=True),
        Observed(now=at_offset(7200), job=job, outcome=observe_job(job, pods_)),
    )
    # The stuck pod is still going away (Suspending, not yet Suspended): never a timeout.
    assert result.status["phase"] != "Failed" and result.actions == []
    assert cond(result.status, "Suspended")["reason"] == "Suspending"  # type: ignore[index]


def test_a_cleared_stuck_reason_does_not_linger() -> None:
    stuck = pending_plan([waiting_pod(0, "ImagePullBackOff", PULL_MESSAGE)])
    pulled = pending_plan([waiting_pod(0, "ContainerCreating")], status=stuck.status)
    running = cond(pulled.status, "Running")
    assert running is not None and running["reason"] == "PodsPending"
    assert pulled.requeue_after == 10


def test_messages_are_bounded_and_token_free() -> None:
    said = "pull failed: Authorization: Bearer abc.def token hf_abcdefghijklmnop " + "x" * 2000
    result = pending_plan([waiting_pod(0, "ErrImagePull", said)])
    message = cond(result.status, "Running")["message"]  # type: ignore[index]
    assert "abc.def" not in message and "hf_abcdefghijklmnop" not in message
    assert len(message) <= len("pod demo-0-abcde: ") + 512


CREATE_ERROR = (
    'Error creating: pods "demo-0-" is forbidden: error looking up service account ns/trainer: '
    'serviceaccount "trainer" not found'
)


def failed_create(uid: str = "job-1", when: str = NOW, message: str = CREATE_ERROR) -> dict:
    return {
        "reason": "FailedCreate",
        "message": message,
        "involvedObject": {"kind": "Job", "uid": uid},
        "lastTimestamp": when,
    }


def test_pods_that_cannot_be_created_say_why_from_the_jobs_events() -> None:
    job = started_job()
    assert needs_events(job, [])
    assert not needs_events(job, [pod(0, "Pending"), pod(1, "Pending")])
    assert not needs_events(started_job(suspend=True), [])
    assert not needs_events(batch_job(cond=FAILED_JOB), [])
    events = [
        failed_create(when=NOW, message="Error creating: exceeded quota"),
        failed_create(when=LATER),
        failed_create(uid="job-0", when=at_offset(3600), message="an older attempt's"),
    ]
    out = observe_job(job, [], events)
    assert out.stuck is not None and out.stuck.reason == "FailedCreate"
    assert out.stuck.message == f"Job demo: {CREATE_ERROR}"
    result = plan(ftj({"attempts": 1}), Observed(now=NOW, job=job, outcome=out))
    running = cond(result.status, "Running")
    assert running is not None and running["reason"] == "FailedCreate"
    late = plan(ftj({"attempts": 1}), Observed(now=at_offset(600), job=job, outcome=out))
    failed = cond(late.status, "Failed")
    assert failed is not None and failed["reason"] == "PendingTimeout"
    assert "serviceAccountName" in failed["message"]
    # Without Events (none yet, or no RBAC to list them) it waits and looks again.
    waiting = plan(ftj({"attempts": 1}), observed(job, []))
    assert cond(waiting.status, "Running") is None and waiting.requeue_after == 10


def test_a_new_job_is_looked_at_again_until_its_pods_are_made() -> None:
    """Why the Job controller cannot make a pod is only in its Events, which nothing watches."""
    first = plan(ftj(), observed(None))
    assert [a.kind for a in first.actions] == ["create"]
    assert first.requeue_after is None  # the pass that creates it plans again with the Job
    assert plan(ftj({"attempts": 1}), observed(started_job(), [])).requeue_after == 10
    # Less often as the Job ages, up to once a minute.
    one_made = [waiting_pod(0, "ContainerCreating")]
    assert [pending_plan(one_made, now=at_offset(s)).requeue_after for s in (50, 300, 7200)] == [
        10,
        30,
        60,
    ]
    both_made = [*one_made, pod(1, "Pending")]
    assert pending_plan(both_made, now=at_offset(50)).requeue_after is None


# ---- a stopped pod is replaced, and the gang rejoins it in place -----------------------------

STOPPED_HERE = json.dumps(
    {"status": "Failed", "reason": "Interrupted", "message": "stopped by SIGTERM at step 12"}
)
RUNNING_GANG = {
    "phase": "Running",
    "attempts": 1,
    "progress": {"step": 12, "totalSteps": 90},
    "checkpoints": {"attempt": 1, "resumedFromStep": 0, "lastResumeTime": "2026-01-01T00:00:00Z"},
    "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning"}],
}


def test_a_pod_stopped_with_exit_143_restarts_in_place_as_a_disruption() -> None:
    # Rank 1 got SIGTERM at 00:01:00 and exited 143 (the Job ignores it); rank 0 runs on.
    pods_ = [pod(0, "Running"), ended(1, 143, STOPPED_HERE, at="2026-01-01T00:01:00Z")]
    out = observe_job(batch_job(parallelism=2), pods_)
    assert out.state is State.RUNNING and out.leaving is not None
    assert out.leaving.what == "pod demo-1-abcde got SIGTERM"
    result = plan(ftj(RUNNING_GANG, backoffLimit=0), observed(batch_job(parallelism=2), pods_))
    assert result.actions == [] and result.restarted
    assert (result.status["attempts"], result.status["disruptions"]) == (1, 1)
    assert result.status["checkpoints"]["lastRestartTime"] == "2026-01-01T00:01:00Z"
    running = cond(result.status, "Running")
    assert running is not None and running["reason"] == "Restarting"
    assert running["message"].startswith("pod demo-1-abcde got SIGTERM: the Job replaces")
    assert ("NotRunning", "Restarting") in [t[:2] for t in result.transitions]
    # The next pass sees the same pod (and its replacement, not started): no second restart.
    again = plan(ftj(result.status, backoffLimit=0), observed(batch_job(parallelism=2), pods_))
    assert not again.restarted and again.status["disruptions"] == 1
    assert cond(again.status, "Running")["reason"] == "Restarting"  # type: ignore[index]
    # The replacement runs and rank 0 reports the re-formed gang's resume, 25 s after the stop.
    back = [pod(0, "Running"), pods_[1], pod(1, "Running")]
    resumed = plan(
        ftj(again.status, backoffLimit=0),
        observed(
            batch_job(parallelism=2),
            back,
            resumed_from_step=12,
            resumed_at="2026-01-01T00:01:25Z",
            progress={"step": 13, "totalSteps": 90},
        ),
    )
    assert resumed.restart_seconds == 25.0 and not resumed.restarted
    ckpt = resumed.status["checkpoints"]
    assert (ckpt["resumedFromStep"], ckpt["stepsLost"], ckpt["attempt"]) == (12, 0, 1)
    assert ckpt["lastResumeTime"] == "2026-01-01T00:01:25Z"
    assert cond(resumed.status, "Running")["status"] == "True"  # type: ignore[index]
    # The stopped pod, still listed, is no new restart once the gang resumed.
    later = plan(ftj(resumed.status, backoffLimit=0), observed(batch_job(parallelism=2), back))
    assert not later.restarted and later.status["disruptions"] == 1
    assert later.restart_seconds is None


def test_an_eviction_that_then_ends_the_attempt_is_one_disruption() -> None:
    """Rank 1 is evicted and the gang starts to restart in place; then rank 0 stops too, which
    ends the attempt. Whichever the operator sees first, it is one disruption."""
    evicted_pod = evicted(1, at=LATER)  # after the gang last resumed (RUNNING_GANG)
    running = plan(
        ftj(RUNNING_GANG, backoffLimit=0),
        observed(batch_job(parallelism=2), [pod(0, "Running"), evicted_pod]),
    )
    assert running.restarted and running.status["disruptions"] == 1
    ended_pods = [ended(0, 1, INTERRUPTED, at="2026-01-01T00:02:00Z"), evicted_pod]
    for previous, said in (
        (running.status, "attempt 1 ended after pod demo-1-abcde was disrupted (Eviction"),
        (RUNNING_GANG, "attempt 1 was disrupted (pod demo-1-abcde was disrupted (Eviction"),
    ):
        result = restart_of(previous, 1, ended_pods, limit=0)
        assert (result.status["attempts"], result.status["disruptions"]) == (2, 1)
        assert result.status["phase"] == "Pending"  # free: backoffLimit 0 is not spent
        message = cond(result.status, "Running")["message"]  # type: ignore[index]
        assert said in message and "does not count against" in message, message
    # A later eviction in the next attempt is a disruption of its own.
    after = restart_of(result.status, 2, [evicted(0, at="2026-01-01T01:00:00Z")], limit=0)
    assert (after.status["attempts"], after.status["disruptions"]) == (3, 2)


def test_the_job_stopping_the_rest_of_a_failed_gang_is_no_second_disruption() -> None:
    """Rank 1 is evicted and its replacement cannot be scheduled; then rank 0 fails, and the Job
    controller deletes the replacement before its FailureTarget condition shows. A pass in that
    window sees a pod terminating after the restart it counted: the gang stopping, not another
    disruption (seen on a busy control plane, where the Unschedulable reason had replaced
    Restarting on the Running condition)."""
    replacement = pod(1, "Pending")
    replacement["metadata"].update(name="demo-1-fghij", creationTimestamp=LATER)
    replacement["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no"}
    ]
    evicted_pod = evicted(1, at=LATER)
    job = batch_job(parallelism=2)
    first = plan(
        ftj(RUNNING_GANG, backoffLimit=0),
        observed(job, [pod(0, "Running"), evicted_pod, replacement]),
    )
    assert first.restarted and first.status["disruptions"] == 1
    assert cond(first.status, "Running")["reason"] == "Unschedulable"  # type: ignore[index]
    deleted = copy.deepcopy(replacement)
    deleted["metadata"].update(deletionTimestamp=at_offset(150), deletionGracePeriodSeconds=30)
    crashed = ended(0, 1, INTERRUPTED, at=at_offset(110))
    window = plan(ftj(first.status, backoffLimit=0), observed(job, [crashed, evicted_pod, deleted]))
    assert not window.restarted and window.actions == []
    assert window.status["disruptions"] == 1
    # Then FailureTarget: the attempt ends after that one disruption, which is not counted again.
    ended_ = restart_of(window.status, 1, [crashed, evicted_pod, deleted], limit=0)
    assert (ended_.status["attempts"], ended_.status["disruptions"]) == (2, 1)


def test_a_terminating_pod_is_timed_from_its_deletion() -> None:
    """While the stopped pod saves, it is terminating: its deletion started at
    deletionTimestamp minus the grace period."""
    going = pod(1, "Running")
    going["metadata"].update(
        name="demo-1-abcde",
        deletionTimestamp="2026-01-01T00:01:30Z",
        deletionGracePeriodSeconds=30,
    )
    result = plan(ftj(RUNNING_GANG), observed(batch_job(parallelism=2), [pod(0, "Running"), going]))
    assert result.restarted
    assert result.status["checkpoints"]["lastRestartTime"] == "2026-01-01T00:01:00Z"


def test_a_crashed_pod_is_no_in_place_restart() -> None:
    """Exit 1 is a crash: the Job fails the attempt (backoffLimit 0), which the Job's own
    conditions say; until then the pod is not read as replaced."""
    pods_ = [pod(0, "Running"), ended(1, 1, CRASHED, at="2026-01-01T00:01:00Z")]
    assert observe_job(batch_job(parallelism=2), pods_).leaving is None


def test_a_replacement_pod_waits_from_its_own_creation() -> None:
    """pendingTimeoutSeconds counts from when the stuck (replacement) pod was made, not from
    the Job's start an hour earlier."""
    stuck = pod(1, "Pending")
    stuck["metadata"].update(name="demo-1-xyz", creationTimestamp=NOW)
    stuck["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no"}
    ]
    job = batch_job(parallelism=2)
    job["status"]["startTime"] = "2025-12-31T23:00:00Z"
    result = plan(ftj(RUNNING_GANG), observed(job, [pod(0, "Running"), stuck]))
    assert cond(result.status, "Failed") is None
    assert cond(result.status, "Running")["reason"] == "Unschedulable"  # type: ignore[index]


def test_a_pod_replaced_while_no_operator_ran_is_found_by_the_resume() -> None:
    """The operator was down while a pod was stopped and replaced: no pass saw the pod go, but
    rank 0 reports a newer resume within the same attempt. That is a disruption too."""
    back = [pod(0, "Running"), pod(1, "Running")]
    found = plan(
        ftj(RUNNING_GANG),
        observed(
            batch_job(parallelism=2),
            back,
            resumed_from_step=12,
            resumed_at="2026-01-01T00:02:00Z",
            progress={"step": 13, "totalSteps": 90},
        ),
    )
    assert found.restarted and found.status["disruptions"] == 1
    assert found.status["attempts"] == 1 and found.restart_seconds is None
    assert found.status["checkpoints"]["lastResumeTime"] == "2026-01-01T00:02:00Z"
    # Known to have ended then: the attempt's Job has replaced a pod, and no restart is under way.
    assert found.status["checkpoints"]["lastRestartTime"] == "2026-01-01T00:02:00Z"
    assert not restarting(found.status["checkpoints"], 1)
    assert any(
        reason == "Restarting" and "resumed from step 12" in message
        for _, reason, message in found.transitions
    )


def test_new_pods_after_a_suspend_resume_without_a_restart() -> None:
    lifted = {
        **RUNNING_GANG,
        "conditions": [
            *RUNNING_GANG["conditions"],
            {
                "type": "Suspended",
                "status": "False",
                "reason": "Resumed",
                "lastTransitionTime": "2026-01-01T00:01:00Z",
            },
        ],
    }
    back = [pod(0, "Running"), pod(1, "Running")]
    result = plan(
        ftj(lifted),
        observed(
            batch_job(parallelism=2), back, resumed_from_step=12, resumed_at="2026-01-01T00:02:00Z"
        ),
    )
    assert not result.restarted and not result.status.get("disruptions")
    assert result.status["checkpoints"]["resumedFromStep"] == 12


def test_pods_a_suspension_stopped_are_no_disruption_when_the_resume_sees_them() -> None:
    """The pass that resumes a suspended Job looks again after the patch: a pod the suspension
    stopped (exit 143) may still be listed. It is the suspension's, not a restart in place, and
    never a new attempt, even when the attempt had replaced a pod before (a kind fault-suite
    failure: 'a suspend is no new attempt')."""
    suspended = {
        **RUNNING_GANG,
        "disruptions": 1,
        "checkpoints": {
            **RUNNING_GANG["checkpoints"],
            "lastRestartTime": "2026-01-01T00:00:30Z",
        },
        "conditions": [
            {"type": "Running", "status": "False", "reason": "Suspended"},
            {
                "type": "Suspended",
                "status": "True",
                "reason": "Suspended",
                "lastTransitionTime": "2026-01-01T00:01:00Z",
            },
        ],
    }
    stopped = [
        ended(0, 143, STOPPED_HERE, at="2026-01-01T00:01:02Z"),
        ended(1, 143, STOPPED_HERE, at="2026-01-01T00:01:02Z"),
    ]
    result = plan(ftj(suspended), observed(batch_job(parallelism=2), stopped))
    assert not result.restarted and result.status["disruptions"] == 1
    assert result.status["attempts"] == 1
    assert not any(a.kind == "delete" for a in result.actions)
    # Once resumed, a pod stopped later is a disruption again.
    resumed = {
        **suspended,
        "conditions": [
            {"type": "Running", "status": "True", "reason": "PodsRunning"},
            {
                "type": "Suspended",
                "status": "False",
                "reason": "Resumed",
                "lastTransitionTime": "2026-01-01T00:01:10Z",
            },
        ],
    }
    later = [pod(0, "Running"), ended(1, 143, STOPPED_HERE, at="2026-01-01T00:02:00Z")]
    again = plan(ftj(resumed), observed(batch_job(parallelism=2), later))
    assert again.restarted and again.status["disruptions"] == 2


def test_every_token_secret_is_checked_before_the_job_is_created() -> None:
    """A missing read-token Secret blocks the Job as a missing push-token Secret does, and the
    message names the field that refers to it."""
    import asyncio

    from finetune_operator.apply import SecretCheck
    from finetune_operator.reconcile import Reconciler

    class Secrets:
        def __init__(self, found: dict[tuple[str, str], SecretCheck]) -> None:
            self.found = found
            self.asked: list[tuple[str, str]] = []

        async def secret_key_exists(self, namespace: str, name: str, key: str) -> SecretCheck:
            self.asked.append((name, key))
            return self.found.get((name, key), SecretCheck.NO_SECRET)

    job = ftj()
    job.spec.model.token_secret_ref = SecretKeyRef(name="model-read")
    job.spec.dataset.token_secret_ref = SecretKeyRef(name="data-read", key="t")

    def blocker(found: dict[tuple[str, str], SecretCheck]) -> tuple[Any, list[tuple[str, str]]]:
        kube = Secrets(found)
        reconciler = Reconciler(kube, None, None)  # type: ignore[arg-type]
        store = checkpoints.choose(job, default_storage_class=False)
        return asyncio.run(reconciler._blocker(job, store, first=True)), kube.asked

    block, asked = blocker({})
    assert block is not None and block.reason == Reason.SECRET_NOT_FOUND
    assert block.message == "Secret model-read (model.tokenSecretRef) not found"
    block, asked = blocker({("model-read", "token"): SecretCheck.PRESENT})
    assert (
        block is not None and block.message == "Secret data-read (dataset.tokenSecretRef) not found"
    )
    no_key = {("model-read", "token"): SecretCheck.PRESENT, ("data-read", "t"): SecretCheck.NO_KEY}
    block, _ = blocker(no_key)
    assert block is not None and "has no key 't' (dataset.tokenSecretRef)" in block.message
    # All there, or no right to look (UNKNOWN): the Job is created.
    present = {
        ("model-read", "token"): SecretCheck.PRESENT,
        ("data-read", "t"): SecretCheck.UNKNOWN,
    }
    block, asked = blocker(present)
    assert block is None and asked == [("model-read", "token"), ("data-read", "t")]


def test_a_second_stop_in_one_attempt_restarts_the_gang_as_a_new_attempt() -> None:
    """The Job controller waits 10 s to replace a failed pod, 20 s for the next one of the same
    Job, and so on; so only the first stop of an attempt is replaced in place."""
    job = batch_job(parallelism=2)
    job["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    replaced_once = {
        **RUNNING_GANG,
        "disruptions": 1,
        "checkpoints": {
            **RUNNING_GANG["checkpoints"],
            "lastRestartTime": "2026-01-01T00:01:00Z",
            "lastResumeTime": "2026-01-01T00:01:25Z",
        },
    }
    pods_ = [pod(0, "Running"), ended(1, 143, STOPPED_HERE, at="2026-01-01T00:03:00Z")]
    result = plan(ftj(replaced_once), observed(job, pods_))
    assert [a.kind for a in result.actions] == ["delete"] and result.restarted
    assert (result.status["attempts"], result.status["disruptions"]) == (2, 2)
    assert result.status["checkpoints"]["lastRestartTime"] == "2026-01-01T00:03:00Z"
    message = cond(result.status, "Running")["message"]  # type: ignore[index]
    assert "so the gang restarts as attempt 2" in message
    # The first stop of a Job made after the last restart is replaced in place.
    job["metadata"]["creationTimestamp"] = "2026-01-01T00:02:00Z"
    fresh = plan(ftj(replaced_once), observed(job, pods_))
    assert fresh.actions == [] and fresh.status["attempts"] == 1


def test_status_records_the_commits_the_sources_were_loaded_at() -> None:
    job = batch_job(cond=("Complete", "CompletionsReached", ""))
    loaded = {**RESULT_OK, "modelRevision": "a" * 40, "datasetRevision": "b" * 40}
    status = derive_status(
        ftj({"attempts": 1}), observed(job, [pod(0, "Succeeded", 0, json.dumps(loaded))])
    )
    assert status["sources"] == {"modelRevision": "a" * 40, "datasetRevision": "b" * 40}
    FineTuneJobStatus.model_validate(status)
    # A file:// dataset has no commit: only the model's is recorded.
    local = {**RESULT_OK, "modelRevision": "a" * 40}
    status = derive_status(
        ftj({"attempts": 1}), observed(job, [pod(0, "Succeeded", 0, json.dumps(local))])
    )
    assert status["sources"] == {"modelRevision": "a" * 40}
    # text-to-image's model.vae, a third source.
    with_vae = {**loaded, "vaeRevision": "c" * 40}
    status = derive_status(
        ftj({"attempts": 1}), observed(job, [pod(0, "Succeeded", 0, json.dumps(with_vae))])
    )
    assert status["sources"]["vaeRevision"] == "c" * 40
    FineTuneJobStatus.model_validate(status)
    # Neither (file:// sources, or a trainer from before these fields): no sources at all.
    status = derive_status(ftj({"attempts": 1}), observed(job, [pod(0, "Succeeded", 0, OK_MSG)]))
    assert "sources" not in status
