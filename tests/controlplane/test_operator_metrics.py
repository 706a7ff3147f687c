"""The operator's per-job series, from the real operator process: they name each FineTuneJob
with its phase, the reason behind it and its attempt, follow restarts and failures, and go away
with the job. The tests play the kubelet by writing pod status."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.cluster import (
    condition,
    ftj_manifest,
    ftj_status,
    patch_pod_status,
    succeed,
    terminated_status,
)
from fixtures.kube import Kube
from fixtures.operator import Operator
from prometheus_client.parser import text_string_to_metric_families

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
CRASH = json.dumps({"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error"})
PUSHED = {"status": "Succeeded", "reason": "PushedToHub", "message": "pushed", "steps": 10}


def job_series(operator: Operator, namespace: str, name: str) -> dict[str, Any]:
    """The job's `finetune_operator_job_status` labels and `finetune_operator_job_attempt`
    value, as the operator's /metrics shows them now; {} when it has none."""
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("namespace") != namespace or labels.get("finetunejob") != name:
                continue
            if sample.name == "finetune_operator_job_status":
                assert sample.value == 1, sample
                assert "status" not in out, f"two status series for one job: {sample}"
                out["status"] = (labels["phase"], labels["reason"])
            elif sample.name == "finetune_operator_job_attempt":
                out["attempt"] = int(sample.value)
    return out


def pods(kube: Kube, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
    sel = f"finetune.dev/job-name={name},finetune.dev/attempt={attempt}"
    return [
        p
        for p in kube.list("Pod", namespace, labels=sel)
        if not p["metadata"].get("deletionTimestamp")
    ]


def from_status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """What the per-job series should say, read from the FineTuneJob's status: its phase, the
    reason of the condition behind the phase (Running's for Pending), and its attempts."""
    status = ftj_status(kube, namespace, name)
    phase = status.get("phase", "Pending")
    behind = "Running" if phase == "Pending" else phase
    reason = (condition(status, behind) or {}).get("reason", "")
    return {"status": (phase, reason), "attempt": status.get("attempts", 0)}


def test_per_job_series_follow_a_job_through_a_restart_to_failure(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    kube.apply(ftj_manifest("flaky", namespace, runPolicy={"backoffLimit": 1}))

    def agree(phase: str, attempt: int) -> dict[str, Any] | None:
        series = job_series(operator, namespace, "flaky")
        wanted = from_status(kube, namespace, "flaky")
        if series == wanted and wanted["status"][0] == phase and wanted["attempt"] == attempt:
            return series
        return None

    for attempt in (1, 2):
        gang = wait_until(
            lambda a=attempt: len(p := pods(kube, namespace, "flaky", a)) == 2 and p,
            timeout=60,
            message=f"2 pods of attempt {attempt}",
        )
        wait_until(
            lambda a=attempt: agree("Pending", a),
            timeout=30,
            message=f"attempt {attempt}: metrics {job_series(operator, namespace, 'flaky')}",
        )
        status = terminated_status(gang[0], 1, CRASH)
        patch_pod_status(kube, namespace, gang[0]["metadata"]["name"], status)
    series = wait_until(
        lambda: agree("Failed", 2),
        timeout=60,
        message=f"Failed: metrics {job_series(operator, namespace, 'flaky')}",
    )
    assert series == {"status": ("Failed", "BackoffLimitExceeded"), "attempt": 2}
    # A finished job keeps its series (the grace period is an hour); deleting it ends them.
    kube.delete("FineTuneJob", "flaky", namespace)
    wait_until(
        lambda: job_series(operator, namespace, "flaky") == {},
        timeout=60,
        message="the deleted job's series gone",
    )


def passes(operator: Operator) -> int:
    """The reconcile passes the operator process has run."""
    for family in text_string_to_metric_families(operator.metrics()):
        if family.name == "finetune_operator_reconcile_duration_seconds":
            return int(next(s.value for s in family.samples if s.name.endswith("_count")))
    raise AssertionError("no finetune_operator_reconcile_duration_seconds")


def test_a_restart_counts_finished_jobs_without_a_pass(
    operator: Operator,
    kube: Kube,
    kubeconfig: str,
    namespace: str,
    wait_until: WaitUntil,
    tmp_path: Path,
) -> None:
    """An operator that starts over a long history has nothing to do for its finished jobs but
    count them: a pass each would queue ahead of the live jobs' passes. Their Jobs are gone, as
    ttlSecondsAfterFinished leaves them: the operator deletes each once it has recorded the
    outcome (the Job controller's own TTL deleted them unread, and the operator made them
    again)."""
    names = [f"done-{i}" for i in range(3)]
    for name in names:
        kube.apply(ftj_manifest(name, namespace, runPolicy={"ttlSecondsAfterFinished": 0}))
        succeed(kube, wait_until, namespace, name, PUSHED)
    wait_until(lambda: not kube.list("Job", namespace), timeout=60, message="the Jobs' TTL")
    for name in names:
        status = ftj_status(kube, namespace, name)
        assert (status["phase"], status["attempts"]) == ("Succeeded", 1), status
    operator.stop()
    # Only this namespace, so that no other test's job gets a pass here.
    scoped = Operator(
        kubeconfig, tmp_path / "operator.log", {"FINETUNE_WATCH_NAMESPACES": namespace}
    )
    try:
        scoped.start()
        want = {n: from_status(kube, namespace, n) for n in names}
        assert all(w["status"][0] == "Succeeded" for w in want.values()), want
        got = wait_until(
            lambda: (s := {n: job_series(scoped, namespace, n) for n in names}) == want and s,
            timeout=30,
            message=f"a series for each finished job: {want}",
        )
        assert passes(scoped) == 0, (got, scoped.logs()[-5000:])
    finally:
        scoped.stop()
        operator.start()
