"""Where an attempt's time went: the pods' times, rank 0's phase stamps, and status.startup /
status.finish as a pass derives them."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry

from finetune_api import phases
from finetune_api.result import MAX_MESSAGE_BYTES, TrainerResult
from finetune_api.validation import parse_manifest
from finetune_operator.lifecycle import observe_job
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.scrape import parse_phases
from finetune_operator.status import Observed, plan
from finetune_operator.timings import derive, pod_times, unix

CREATED = "2026-01-01T00:00:00Z"
T0 = unix(CREATED) or 0.0
# Rank 0's stamps, seconds after creation: as a tiny job on warm nodes reaches them.
OFFSETS = {
    phases.PROCESS_STARTED: 4.2,
    phases.RENDEZVOUS: 4.9,
    phases.DATA_LOADED: 5.6,
    phases.MODEL_LOADED: 6.3,
    phases.EVALUATED_BEFORE: 6.8,
    phases.FIRST_STEP: 7.1,
    phases.LAST_STEP: 20.0,
    phases.EVALUATED_AFTER: 20.4,
    phases.SAVED: 20.6,
    phases.PUSHED: 21.5,
    phases.RESULT_WRITTEN: 21.6,
}
STAMPS = {name: T0 + at for name, at in OFFSETS.items()}


def at(seconds: int) -> str:
    return f"2026-01-01T00:00:{seconds:02d}Z"


def pod(index: int, scheduled: int, started: int, finished: int | None = None, **term: Any) -> dict:
    state: dict[str, Any] = {"running": {"startedAt": at(started)}}
    if finished is not None:
        state = {"terminated": {"startedAt": at(started), "finishedAt": at(finished), **term}}
    return {
        "metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": {
            "phase": "Succeeded" if finished is not None else "Running",
            "podIP": f"10.0.0.{index + 1}",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": at(scheduled)}
            ],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def batch_job(complete: bool = False) -> dict:
    conditions = [{"type": "Complete", "status": "True"}] if complete else []
    return {
        "metadata": {"name": "demo", "uid": "job-1", "labels": {"finetune.dev/attempt": "1"}},
        "spec": {"parallelism": 2, "completions": 2, "suspend": False},
        "status": {"conditions": conditions},
    }


def ftj(status: dict[str, Any] | None = None) -> Any:
    doc: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "demo",
            "namespace": "ns",
            "generation": 1,
            "uid": "u1",
            "creationTimestamp": CREATED,
        },
        "spec": {
            "model": {"source": "hf://org/m", "task": "causal-lm"},
            "dataset": {"source": "hf://org/d"},
            "resources": {"nodes": 2},
        },
    }
    if status is not None:
        doc["status"] = status
    return parse_manifest(doc)


def test_pod_times_wait_for_the_whole_gang() -> None:
    """The gang starts with its last pod: one pod alone gives no time yet."""
    assert pod_times([pod(0, 1, 2)], gang=2) == {}
    both = pod_times([pod(0, 1, 2), pod(1, 2, 3)], gang=2)
    assert both == {phases.SCHEDULED: T0 + 2, phases.CONTAINER_STARTED: T0 + 3}
    ended = pod_times([pod(0, 1, 2, finished=22), pod(1, 2, 3, finished=23)], gang=2)
    assert ended[phases.PODS_EXITED] == T0 + 23


def test_breakdown_is_ordered_and_sums_to_the_total() -> None:
    """Each phase ends after the one before it, and the phases' lengths add up to the time to
    the first step (and from the last step to Succeeded): nothing is counted twice or lost."""
    pods = pod_times([pod(0, 1, 3, finished=22), pod(1, 2, 3, finished=22)], gang=2)
    startup, finish = derive(
        {}, created=CREATED, attempt=1, pods=pods, stamps=STAMPS, finished_at=at(23)
    )
    order = [phases.SCHEDULED, phases.CONTAINER_STARTED]
    order += [phases.STARTUP_FIELDS[p] for p in phases.STARTUP if p != phases.DOWNLOADED]
    assert [k for k in order if k in startup] == order  # every phase reached is there
    ends = [startup[k] for k in order]
    assert ends == sorted(ends)
    lengths = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    assert sum(lengths) == startup["firstStep"] == 7.1
    assert "downloaded" not in startup  # no separate download step ran
    after = ["evaluatedAfter", "saved", "pushed", "resultWritten", "podsExited", "succeeded"]
    assert [finish[k] for k in after] == [0.4, 0.6, 1.5, 1.6, 2.0, 3.0]
    assert startup["attempt"] == finish["attempt"] == 1


def test_values_stay_for_the_attempt_and_reset_for_the_next() -> None:
    first, _ = derive({}, created=CREATED, attempt=1, pods={}, stamps=STAMPS, finished_at=None)
    # A later reading (a pod replaced in place, which stamps its phases again) moves nothing.
    later = {name: stamp + 60 for name, stamp in STAMPS.items()}
    previous = {"startup": first, "finish": {}}
    again, _ = derive(previous, created=CREATED, attempt=1, pods={}, stamps=later, finished_at=None)
    assert again == first
    fresh, finish = derive(
        previous, created=CREATED, attempt=2, pods={}, stamps={}, finished_at=None
    )
    assert fresh == {"attempt": 2} and finish == {"attempt": 2}


def test_skewed_clocks_never_give_negative_seconds() -> None:
    stamps = {phases.PROCESS_STARTED: T0 - 3}
    startup, _ = derive({}, created=CREATED, attempt=1, pods={}, stamps=stamps, finished_at=None)
    assert startup["processStarted"] == 0.0


def test_plan_writes_startup_while_running_and_finish_when_succeeded() -> None:
    """Running: the scraped stamps give status.startup. Complete: rank 0's result gives the
    rest, the pods their exit, and the pass that sets Succeeded its own moment."""
    live = {k: v for k, v in STAMPS.items() if k in phases.STARTUP}
    running = Observed(
        now=at(8),
        job=batch_job(),
        outcome=observe_job(batch_job(), [pod(0, 1, 3), pod(1, 2, 3)]),
        stamps=live,
    )
    status = plan(ftj({"attempts": 1}), running).status
    assert status["phase"] == "Running"
    assert status["startup"]["firstStep"] == 7.1
    assert status["startup"]["containerStarted"] == 3.0
    assert status["finish"] == {"attempt": 1}

    result = TrainerResult(status="Succeeded", reason="PushedToHub", steps=40, phases=STAMPS)
    message = result.to_message()
    done = [pod(0, 1, 3, finished=22, message=message), pod(1, 2, 3, finished=22)]
    observed = Observed(now=at(23), job=batch_job(True), outcome=observe_job(batch_job(True), done))
    final = plan(ftj(status), observed).status
    assert final["phase"] == "Succeeded"
    assert final["startup"] == status["startup"]
    assert final["finish"]["succeeded"] == 3.0
    assert final["finish"]["podsExited"] == 2.0
    assert final["finish"]["resultWritten"] == 1.6
    # The status validates against the API's model (and so the CRD's schema).
    ftj(final)


def test_result_carries_the_stamps_and_drops_them_before_the_verdict() -> None:
    result = TrainerResult(status="Succeeded", reason="PushedToHub", phases=STAMPS)
    parsed = TrainerResult.parse(result.to_message())
    assert parsed is not None and parsed.phases == result.phases
    # A message that must be cut loses the timings before any of the message.
    long = TrainerResult(status="Failed", reason="TrainingFailed", message="x" * 3000)
    names = [f"a_phase_with_a_long_name_{i:02d}" for i in range(24)]
    crowded = long.model_copy(update={"phases": {n: T0 + 0.125 for n in names}})
    doc = json.loads(crowded.to_message())
    assert len(crowded.to_message().encode()) <= MAX_MESSAGE_BYTES
    assert "phases" not in doc and doc["message"] == "x" * 3000
    # Stamps that are not numbers cost only themselves.
    bad = json.dumps({"status": "Succeeded", "phases": {"first_step": "soon"}})
    kept = TrainerResult.parse(bad)
    assert kept is not None and kept.succeeded and kept.phases == {}


def test_parse_phases_reads_rank_0_only() -> None:
    text = (
        "# TYPE finetune_startup_phase_timestamp_seconds gauge\n"
        'finetune_startup_phase_timestamp_seconds{phase="first_step",rank="1"} 5.0\n'
        'finetune_startup_phase_timestamp_seconds{phase="first_step",rank="0"} 7.0\n'
        'finetune_startup_phase_timestamp_seconds{phase="rendezvous",rank="0"} 3.0\n'
    )
    assert parse_phases(text) == {"first_step": 7.0, "rendezvous": 3.0}
    assert parse_phases("garbage {{{") == {}


def test_operator_histograms_observe_each_attempt_once() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    startup = {"attempt": 1, "scheduled": 1.0, "firstStep": 7.1}
    finish = {"attempt": 1, "resultWritten": 1.6, "succeeded": 3.0}
    metrics.observe_timings({}, {"startup": {"attempt": 1, "scheduled": 1.0}})
    metrics.observe_timings({}, {"startup": startup, "finish": finish})
    metrics.observe_timings({"startup": startup, "finish": finish}, {"startup": startup})

    def count(name: str, phase: str) -> float | None:
        return registry.get_sample_value(f"{name}_count", {"phase": phase})

    assert count("finetune_operator_startup_phase_seconds", "firstStep") == 1
    assert count("finetune_operator_startup_phase_seconds", "scheduled") == 1
    assert count("finetune_operator_finish_phase_seconds", "succeeded") == 1
    assert (
        registry.get_sample_value(
            "finetune_operator_finish_phase_seconds_sum", {"phase": "succeeded"}
        )
        == 3.0
    )
