"""Table tests of the pure status derivation and restart decisions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_api.constants import Reason
from finetune_api.v1alpha1 import FineTuneJob
from finetune_api.validation import parse_manifest
from finetune_operator.lifecycle import State, observe_job
from finetune_operator.scrape import parse_metrics, progress_from_metrics
from finetune_operator.status import Blocker, Observed, derive_status, evaluation_summary, plan

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


def test_gate_failure_reason_comes_from_the_trainer() -> None:
    case = CASES[6]
    status = derive_status(ftj(case[1]), observed(case[2], case[3]))
    failed = cond(status, "Failed")
    assert failed and failed["reason"] == "EvaluationGateFailed"
    assert "accuracy 0.3" in failed["message"]


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


def test_same_observation_twice_changes_nothing() -> None:
    first = derive_status(ftj({"attempts": 1}), observed(batch_job(), [pod(0, "Running")]))
    second = plan(
        ftj(first),
        Observed(now=LATER, job=batch_job(), outcome=observe_job(batch_job(), [pod(0, "Running")])),
    )
    assert second.status == first
    assert second.transitions == []


def test_suspend_patches_the_job_and_sets_the_condition() -> None:
    result = plan(ftj({"attempts": 1}, suspend=True), observed(batch_job(), [pod(0, "Running")]))
    assert [a.patch for a in result.actions] == [{"suspend": True}]
    assert result.status["phase"] == "Suspended"
    resumed = plan(ftj(result.status), observed(batch_job(suspend=False), []))
    assert resumed.status["phase"] == "Pending"
    assert cond(resumed.status, "Suspended")["reason"] == "Resumed"  # type: ignore[index]


def test_queued_job_suspend_is_left_to_kueue() -> None:
    result = plan(ftj({"attempts": 1}, queueName="q"), observed(batch_job(suspend=True), []))
    assert result.actions == []
    assert result.status["phase"] == "Pending"


def test_missing_secret_blocks_without_failing() -> None:
    result = plan(
        ftj(), Observed(now=NOW, blocker=Blocker(Reason.SECRET_NOT_FOUND, "Secret hf not found"))
    )
    assert result.actions == []
    assert cond(result.status, "Created")["reason"] == "SecretNotFound"  # type: ignore[index]
    assert result.status["phase"] == "Pending"


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


def test_evaluation_summary_prefers_gated_metric() -> None:
    ev = {"f1": {"before": 0.1, "after": 0.2}, "accuracy": {"before": 0.5, "after": 0.8}}
    assert evaluation_summary(ev, {"accuracy": 0.7}) == "accuracy 0.5→0.8"
    assert evaluation_summary(ev, {}) == "f1 0.1→0.2"


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
