"""OperatorMetrics' per-job series: what a status becomes, how long a finished job keeps its
series, and that a reconcile pass's status write feeds them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator.checkpoints import RetainedClaim
from finetune_operator.metrics import FINISHED_SECONDS, OperatorMetrics, job_state
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings
from finetune_operator.status import Plan

T0 = 1_800_000_000.0  # an arbitrary "now", in Unix seconds
KEY = ("ml", "news-lora")


def rfc3339(unix: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cond(type_: str, status: str, reason: str, at: float = T0) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": "",
        "lastTransitionTime": rfc3339(at),
    }


def stuck(attempts: int = 1) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "attempts": attempts,
        "conditions": [
            cond("Created", "True", "WorkloadCreated"),
            cond("Running", "False", "Unschedulable"),
        ],
    }


def failed(at: float, reason: str = "BackoffLimitExceeded") -> dict[str, Any]:
    return {
        "phase": "Failed",
        "attempts": 4,
        "completionTime": rfc3339(at),
        "conditions": [cond("Running", "False", reason, at), cond("Failed", "True", reason, at)],
    }


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: OperatorMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(metrics.registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def labels(namespace: str, name: str, phase: str, reason: str) -> dict[str, str]:
    return {"namespace": namespace, "finetunejob": name, "phase": phase, "reason": reason}


def new_metrics(clock: Clock) -> OperatorMetrics:
    return OperatorMetrics(registry=CollectorRegistry(), clock=clock)


def test_state_reads_the_condition_behind_the_phase() -> None:
    state = job_state(stuck(attempts=2), None, T0)
    assert (state.phase, state.reason, state.attempt, state.finished_at) == (
        "Pending",
        "Unschedulable",
        2,
        None,
    )
    # A gate failure's reason is the Failed condition's, and its end is completionTime.
    gate = job_state(failed(T0 - 60, "EvaluationGateFailed"), None, T0)
    assert (gate.phase, gate.reason, gate.finished_at) == (
        "Failed",
        "EvaluationGateFailed",
        T0 - 60,
    )
    # A new job (no conditions yet) is Pending with no reason.
    assert job_state({}, None, T0) == job_state({"phase": "Pending"}, None, T0)
    assert job_state({}, None, T0).reason == ""


def test_finished_without_completion_time_keeps_when_it_was_first_seen() -> None:
    bare = {"phase": "Succeeded"}
    first = job_state(bare, None, T0)
    assert first.finished_at == T0
    assert job_state(bare, first, T0 + 500).finished_at == T0


def test_one_series_per_job_with_namespace_name_phase_and_reason() -> None:
    clock = Clock()
    metrics = new_metrics(clock)
    metrics.observe_job(KEY, stuck(attempts=1))
    metrics.observe_job(("other", "running"), {"phase": "Running", "attempts": 3})
    samples = scrape(metrics)
    series = sorted(samples["finetune_operator_job_status"], key=lambda s: s[0]["namespace"])
    assert series == [
        (labels("ml", "news-lora", "Pending", "Unschedulable"), 1.0),
        (labels("other", "running", "Running", ""), 1.0),
    ]
    attempts = {lb["finetunejob"]: v for lb, v in samples["finetune_operator_job_attempt"]}
    assert attempts == {"news-lora": 1, "running": 3}
    # A restart moves the same job to its next attempt: still one series per family.
    metrics.observe_job(KEY, {"phase": "Running", "attempts": 2})
    samples = scrape(metrics)
    mine = [lb for lb, _ in samples["finetune_operator_job_status"] if lb["finetunejob"] == KEY[1]]
    assert [lb["phase"] for lb in mine] == ["Running"]
    attempts = {lb["finetunejob"]: v for lb, v in samples["finetune_operator_job_attempt"]}
    assert attempts["news-lora"] == 2
    phases = {lb["phase"]: v for lb, v in samples["finetune_operator_jobs"]}
    assert phases["Running"] == 2 and phases["Pending"] == 0


def test_a_finished_job_keeps_its_series_for_the_grace_period_only() -> None:
    clock = Clock()
    metrics = new_metrics(clock)
    metrics.observe_job(KEY, failed(at=T0))
    assert scrape(metrics)["finetune_operator_job_status"][0][0]["reason"] == "BackoffLimitExceeded"
    clock.now = T0 + FINISHED_SECONDS - 1
    assert len(scrape(metrics)["finetune_operator_job_status"]) == 1
    # Gone at scrape time, with no reconcile pass in between.
    clock.now = T0 + FINISHED_SECONDS + 1
    samples = scrape(metrics)
    assert "finetune_operator_job_status" not in samples
    assert "finetune_operator_job_attempt" not in samples
    # The per-phase count still knows the job: it exists.
    phases = {lb["phase"]: v for lb, v in samples["finetune_operator_jobs"]}
    assert phases["Failed"] == 1


def test_a_restarted_operator_does_not_revive_jobs_that_finished_long_ago() -> None:
    clock = Clock()
    metrics = new_metrics(clock)
    metrics.observe_job(KEY, failed(at=T0 - 2 * FINISHED_SECONDS))
    metrics.observe_job(("ml", "recent"), failed(at=T0 - 60))
    names = [lb["finetunejob"] for lb, _ in scrape(metrics)["finetune_operator_job_status"]]
    assert names == ["recent"]


def test_a_deleted_job_loses_its_series_at_once() -> None:
    metrics = new_metrics(Clock())
    metrics.observe_job(KEY, stuck())
    metrics.observe_phase(KEY, None)  # what Reconciler.forget calls
    samples = scrape(metrics)
    assert "finetune_operator_job_status" not in samples
    assert all(v == 0 for _, v in samples["finetune_operator_jobs"])


def test_each_kept_claim_has_its_size_and_age_until_it_is_adopted_or_deleted() -> None:
    metrics = new_metrics(Clock())
    kept = RetainedClaim("ml", "news-lora-checkpoints", "news-lora", 2.0 * 2**30, T0)
    other = replace(kept, name="other-checkpoints", job_name="other", since=T0 + 60)
    for claim in (kept, other):
        metrics.observe_claim((claim.namespace, claim.name), claim)
    samples = scrape(metrics)
    size = "finetune_operator_retained_claim_bytes"
    since = "finetune_operator_retained_claim_timestamp_seconds"
    names = [
        {"namespace": c.namespace, "persistentvolumeclaim": c.name, "finetunejob": c.job_name}
        for c in (kept, other)
    ]
    assert samples[size] == [(names[0], 2.0 * 2**30), (names[1], 2.0 * 2**30)]
    assert samples[since] == [(names[0], T0), (names[1], T0 + 60)]
    # Adopted (or deleted): what the claim watch reports as None.
    metrics.observe_claim(("ml", "news-lora-checkpoints"), None)
    assert scrape(metrics)[size] == [(names[1], 2.0 * 2**30)]
    metrics.observe_claim(("ml", "other-checkpoints"), None)
    assert since not in scrape(metrics)


class RecordingKube:
    def __init__(self) -> None:
        self.patched: list[dict[str, Any]] = []

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patched.append(status)

    async def post_event(self, *_: Any) -> None:
        return None


def test_a_pass_that_writes_status_feeds_the_per_job_series() -> None:
    metrics = new_metrics(Clock())
    kube = RecordingKube()
    reconciler = Reconciler(kube, Settings(), metrics)  # type: ignore[arg-type]
    body = {"metadata": {"namespace": KEY[0], "name": KEY[1]}, "status": {}}
    plan = Plan(status=stuck(attempts=1), actions=[], transitions=[])
    asyncio.run(reconciler._write(body, {}, plan))
    assert kube.patched and kube.patched[0]["phase"] == "Pending"
    (found, value), *_ = scrape(metrics)["finetune_operator_job_status"]
    assert (found, value) == (labels(*KEY, "Pending", "Unschedulable"), 1.0)
    reconciler.forget(*KEY)
    assert "finetune_operator_job_status" not in scrape(metrics)


def test_a_restart_is_counted_by_its_cause() -> None:
    """A restart the pass counted as a disruption (status.disruptions went up) is one; any other
    is a failure, which spends backoffLimit. Both series exist from the start."""
    metrics = new_metrics(Clock())
    reconciler = Reconciler(RecordingKube(), Settings(), metrics)  # type: ignore[arg-type]

    def restarts() -> dict[str, float]:
        found = scrape(metrics)["finetune_operator_job_restarts_total"]
        return {sample["cause"]: value for sample, value in found}

    assert restarts() == {"failure": 0.0, "disruption": 0.0}
    body = {"metadata": {"namespace": KEY[0], "name": KEY[1]}, "status": {}}
    for previous, status in (
        ({"attempts": 1}, {**stuck(attempts=2), "disruptions": 1}),  # a lost node
        ({"attempts": 2, "disruptions": 1}, {**stuck(attempts=3), "disruptions": 1}),  # a crash
        ({"attempts": 3, "disruptions": 1}, {**stuck(attempts=3), "disruptions": 2}),  # evicted
    ):
        plan = Plan(status=status, actions=[], transitions=[], restarted=True)
        asyncio.run(reconciler._write({**body, "status": previous}, previous, plan))
    assert restarts() == {"failure": 1.0, "disruption": 2.0}


def test_every_reason_a_job_fails_with_has_its_failure_series_from_the_start() -> None:
    """increase() sees a reason's first failure only where its series existed before, at 0: the
    trainer's permanent verdicts (DeviceOutOfMemory among them) and the operator's own."""
    failed = {
        sample["reason"]: value
        for sample, value in scrape(new_metrics(Clock()))["finetune_operator_jobs_failed_total"]
    }
    expected = {"DeviceOutOfMemory", "OOMKilled", "InvalidDataset", "AcceleratorUnavailable"}
    expected |= {"PendingTimeout", "BackoffLimitExceeded", "PushFailed", "NameConflict"}
    assert expected <= set(failed) and set(failed.values()) == {0.0}
