"""The operator's per-job series, from the real operator process: they name each FineTuneJob
with its phase, the reason behind it and its attempt, follow restarts and failures, and go away
with the job. The tests play the kubelet by writing pod status."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fixtures.cluster import (
    condition,
    ftj_manifest,
    ftj_status,
    patch_pod_status,
    terminated_status,
)
from fixtures.kube import Kube
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
CRASH = json.dumps({"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error"})


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
