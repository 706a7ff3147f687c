"""Disruptions restart a gang without spending runPolicy.backoffLimit, and pods that cannot
start say why and end the job after runPolicy.pendingTimeoutSeconds, against the real Job
controller. The tests play the kubelet (and the eviction API) by writing pod status.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fixtures.cluster import (
    condition,
    ftj_manifest,
    ftj_status,
    patch_pod_status,
    running_status,
    terminated_status,
    wait_phase,
)
from fixtures.kube import Kube

if TYPE_CHECKING:
    from fixtures.operator import Operator, Rank0Metrics

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
Obj = dict[str, Any]
INTERRUPTED = json.dumps(
    {"status": "Failed", "reason": "Interrupted", "message": "stopped by SIGTERM at step 7"}
)


def pods(kube: Kube, namespace: str, name: str, attempt: int) -> list[Obj]:
    sel = f"finetune.dev/job-name={name},finetune.dev/attempt={attempt}"
    items = kube.list("Pod", namespace, labels=sel)
    return sorted(
        (p for p in items if not p["metadata"].get("deletionTimestamp")),
        key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]),
    )


def wait_pods(kube: Kube, wait_until: WaitUntil, ns: str, name: str, attempt: int) -> list[Obj]:
    return wait_until(
        lambda: (p := pods(kube, ns, name, attempt)) and len(p) == 2 and p,
        timeout=60,
        message=f"2 pods of attempt {attempt}",
    )


def live_pods(kube: Kube, namespace: str, name: str, attempt: int = 1) -> list[Obj]:
    """The attempt's pods that have not failed: a replaced pod stays listed, Failed."""
    return [p for p in pods(kube, namespace, name, attempt) if p["status"].get("phase") != "Failed"]


def restart_events(kube: Kube, namespace: str, name: str) -> list[str]:
    events = kube.list("Event", namespace, fields=f"involvedObject.name={name}")
    return [e["message"] for e in events if e["reason"] == "Restarting"]


def stopped(pod: Obj, exit_code: int, message: str, at: str) -> Obj:
    status = terminated_status(pod, exit_code, message)
    status["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = at
    return status


def test_an_eviction_restarts_the_gang_without_spending_the_backoff_limit(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    kube.apply(ftj_manifest("evicted", namespace, runPolicy={"backoffLimit": 0}))
    first = wait_pods(kube, wait_until, namespace, "evicted", 1)
    # Rank 1 is evicted: the eviction API marks it DisruptionTarget, its trainer saves and
    # stops. The Job's podFailurePolicy ignores that pod (and replaces it); rank 0 then stops
    # too, which fails the attempt's Job.
    evicted = stopped(first[1], 1, INTERRUPTED, "2026-01-01T00:00:00Z")
    evicted["conditions"] = [
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ]
    patch_pod_status(kube, namespace, first[1]["metadata"]["name"], evicted)
    # The operator sees the pod replaced in place before the attempt ends (on a busy machine it
    # did so by chance, and then counted or worded the end of the attempt as a second fault).
    wait_until(lambda: restart_events(kube, namespace, "evicted"), timeout=60, message="in place")
    rank0 = stopped(first[0], 1, INTERRUPTED, "2026-01-01T00:00:02Z")
    patch_pod_status(kube, namespace, first[0]["metadata"]["name"], rank0)
    second = wait_pods(kube, wait_until, namespace, "evicted", 2)
    status = ftj_status(kube, namespace, "evicted")
    assert (status["attempts"], status["disruptions"]) == (2, 1)
    assert status["phase"] == "Pending"
    restarts = wait_until(
        lambda: len(r := restart_events(kube, namespace, "evicted")) == 2 and r,
        timeout=120,
        message="the attempt's restart Event",
    )
    # Listed in no particular order.
    (ended,) = [m for m in restarts if m.startswith("attempt 1 ended after pod evicted-1-")]
    (in_place,) = [m for m in restarts if m != ended]
    assert "was disrupted (EvictionByEvictionAPI" in in_place
    assert "does not count against runPolicy.backoffLimit" in in_place
    assert "(EvictionByEvictionAPI" in ended
    assert "does not count against runPolicy.backoffLimit" in ended
    # An ordinary failure still ends a job whose backoffLimit is 0.
    crash = json.dumps({"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error"})
    patch_pod_status(
        kube, namespace, second[0]["metadata"]["name"], terminated_status(second[0], 1, crash)
    )
    status = wait_phase(kube, wait_until, namespace, "evicted", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"].startswith("1 attempt(s) failed (and 1 disrupted")
    assert (status["attempts"], status["disruptions"]) == (2, 1)


def test_a_stopped_pod_is_replaced_and_the_gang_rejoins_it_in_place(
    operator: Operator,
    kube: Kube,
    namespace: str,
    wait_until: WaitUntil,
    rank0_metrics: Rank0Metrics,
) -> None:
    """`kubectl delete pod` of rank 1: its trainer saves with the gang and exits 143, which the
    Job's podFailurePolicy ignores, so the real Job controller replaces just that pod. Rank 0's
    pod stays (its ranks rejoin), the attempt and its Job stay, and the restart is a disruption:
    with backoffLimit 0 the job goes on, and it is timed to rank 0's report of the resume."""
    kube.apply(ftj_manifest("rejoin", namespace, runPolicy={"backoffLimit": 0}))
    first = wait_pods(kube, wait_until, namespace, "rejoin", 1)
    job_uid = kube.get("Job", "rejoin", namespace)["metadata"]["uid"]
    started = "2026-01-01T00:00:00Z"
    rank0_metrics.set(step=12, total=100, resumed=0, resumed_at=1767225600.0)  # = started
    for pod in first:
        patch_pod_status(
            kube, namespace, pod["metadata"]["name"], running_status(pod, rank0_metrics.ip)
        )
    wait_until(
        lambda: ftj_status(kube, namespace, "rejoin").get("progress", {}).get("step") == 12,
        timeout=60,
        message="progress of the first gang",
    )
    assert ftj_status(kube, namespace, "rejoin")["checkpoints"]["lastResumeTime"] == started

    # Rank 1 got SIGTERM at 00:01:00, the gang saved step 12, and its trainer exited 143.
    stopped_rank1 = json.dumps(
        {"status": "Failed", "reason": "Interrupted", "message": "stopped by SIGTERM at step 12"}
    )
    patch_pod_status(
        kube,
        namespace,
        first[1]["metadata"]["name"],
        stopped(first[1], 143, stopped_rank1, "2026-01-01T00:01:00Z"),
    )
    restarting = wait_until(
        lambda: (s := ftj_status(kube, namespace, "rejoin")).get("disruptions") == 1 and s,
        timeout=60,
        message="the restart recorded",
    )
    assert restarting["attempts"] == 1
    assert restarting["checkpoints"]["lastRestartTime"] == "2026-01-01T00:01:00Z"
    # Running is False: Restarting, or (here, with no node for the replacement) Unschedulable.
    assert condition(restarting, "Running")["status"] == "False"
    restarts = wait_until(
        lambda: restart_events(kube, namespace, "rejoin"), timeout=30, message="the Event"
    )
    assert len(restarts) == 1, restarts
    assert restarts[0].startswith(f"pod {first[1]['metadata']['name']} got SIGTERM: the Job")
    assert "rejoins it in place" in restarts[0]

    # The Job controller made a new pod for index 1; rank 0's pod is the same one.
    live = wait_until(
        lambda: (p := live_pods(kube, namespace, "rejoin")) and len(p) == 2 and p,
        timeout=60,
        message="a replacement for index 1",
    )
    assert live[0]["metadata"]["uid"] == first[0]["metadata"]["uid"]
    assert live[1]["metadata"]["uid"] != first[1]["metadata"]["uid"]
    assert kube.get("Job", "rejoin", namespace)["metadata"]["uid"] == job_uid
    patch_pod_status(
        kube, namespace, live[1]["metadata"]["name"], running_status(live[1], rank0_metrics.ip)
    )
    # The re-formed gang resumed from step 12 at 00:01:25: a 25 s restart, no step lost.
    rank0_metrics.set(step=13, total=100, resumed=12, resumed_at=1767225685.0)
    status = wait_until(
        lambda: (
            (s := ftj_status(kube, namespace, "rejoin"))["checkpoints"].get("resumedFromStep") == 12
            and s
        ),
        timeout=60,
        message="the resume of the re-formed gang",
    )
    assert status["checkpoints"]["lastResumeTime"] == "2026-01-01T00:01:25Z"
    assert (status["checkpoints"]["stepsLost"], status["attempts"]) == (0, 1)
    assert condition(status, "Running")["status"] == "True"
    assert status["phase"] == "Running"
    # Observed right after the status write that records the resume, so it is waited for.
    wait_until(
        lambda: (
            [
                line
                for line in operator.metrics().splitlines()
                if line.startswith("finetune_operator_restart_seconds_sum")
            ]
            == ["finetune_operator_restart_seconds_sum 25.0"]
        ),
        timeout=15,
        message="the restart's 25 s in finetune_operator_restart_seconds",
    )
    assert len(restart_events(kube, namespace, "rejoin")) == 1  # one restart, one Event


def test_pods_that_cannot_start_say_why_and_end_the_job(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    policy = {"pendingTimeoutSeconds": 30}
    kube.apply(ftj_manifest("pull", namespace, runPolicy=policy))
    # No pod can be made: the admission plugin refuses pods of a missing ServiceAccount.
    template = {"serviceAccountName": "missing-sa"}
    kube.apply(ftj_manifest("nosa", namespace, runPolicy=policy, template=template))
    gang = wait_pods(kube, wait_until, namespace, "pull", 1)
    # Rank 1 runs; rank 0's node cannot pull the image (the Job's ready count moves with rank 1).
    waiting = {
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "registry.example/trainer:nope"',
    }
    container = {"name": "trainer", "image": "registry.example/trainer:nope", "imageID": ""}
    stuck = {
        "phase": "Pending",
        "containerStatuses": [
            {**container, "ready": False, "restartCount": 0, "state": {"waiting": waiting}}
        ],
    }
    patch_pod_status(kube, namespace, gang[0]["metadata"]["name"], stuck)
    patch_pod_status(
        kube, namespace, gang[1]["metadata"]["name"], running_status(gang[1], "10.0.0.2")
    )

    def reason(name: str) -> str:
        return condition(ftj_status(kube, namespace, name), "Running").get("reason", "")

    wait_until(lambda: reason("pull") == "ImagePullBackOff", timeout=20, message="pull reason")
    running = condition(ftj_status(kube, namespace, "pull"), "Running")
    assert running["message"] == f"pod {gang[0]['metadata']['name']}: {waiting['message']}"
    wait_until(lambda: reason("nosa") == "FailedCreate", timeout=30, message="nosa reason")
    running = condition(ftj_status(kube, namespace, "nosa"), "Running")
    assert running["message"].startswith("Job nosa: Error creating:")
    assert 'serviceaccount "missing-sa" not found' in running["message"]
    for name, fix in (("pull", "spec.template.image"), ("nosa", "serviceAccountName")):
        status = wait_phase(kube, wait_until, namespace, name, "Failed", timeout=60)
        failed = condition(status, "Failed")
        assert failed["reason"] == "PendingTimeout", failed
        assert "runPolicy.pendingTimeoutSeconds (30 s" in failed["message"]
        assert fix in failed["message"]
        # The Job goes, so that nothing starts training for a Failed FineTuneJob.
        wait_until(
            lambda n=name: kube.get("Job", n, namespace) is None,
            timeout=60,
            message=f"Job {name} deleted",
        )
    events = kube.list("Event", namespace, fields="involvedObject.name=pull")
    assert ("Warning", "ImagePullBackOff") in {(e["type"], e["reason"]) for e in events}
