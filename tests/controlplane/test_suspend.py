"""runPolicy.suspend against a real API server and Job controller, with and without Kueue.

A suspend stops the gang through the SIGTERM path: the Job is suspended, the Job controller
deletes the pods, and each trainer saves a checkpoint and exits with reason Interrupted before
its pod goes. There is no kubelet here, so the tests play it: a finalizer of the test's keeps
each deleted pod terminating (as a kubelet does during the grace period) until the test
reports the container's exit and lets the pod go. Status must say Suspending until then, and
Suspended only once the pods are gone.

With runPolicy.queueName, Kueue owns Job.spec.suspend, and the operator suspends and resumes
through the Workload's spec.active. Kueue's real Workload CRD is installed (hack/kueue-crd.sh,
Kueue v0.17.0), but Kueue's controller is NOT running: `KueueStandIn`
(fixtures/kueue.py) stands in for it, and does, only when the test calls it, what Kueue's Job
integration would (create the Workload, admit it and unsuspend the Job, evict a deactivated
Workload by suspending its Job). Building and wiring the real controller (a large Go program
with webhooks, certificates and ten more CRDs) did not fit this suite: its build alone had not
finished after 9 minutes on a two-core machine. So these tests prove the operator's half
(what it reads and writes, and the status it derives) through the real API server, and take
Kueue's half from Kueue's source, not from a run of Kueue.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
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
from fixtures.kueue import CRD_NAME, KueueStandIn, install_workload_crd, uninstall_workload_crd

if TYPE_CHECKING:
    from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
# The test's stand-in for a kubelet that is still stopping a deleted pod's container.
KUBELET_FINALIZER = "finetune.dev/test-kubelet"
INTERRUPTED = json.dumps(
    {"status": "Failed", "reason": "Interrupted", "message": "SIGTERM: saved step 40"}
)


@pytest.fixture(scope="module")
def workload_crd(kube: Kube, operator: Operator) -> Iterator[str]:
    """Kueue's Workload CRD, installed after the operator started (it must notice), and removed
    again so that the rest of the session runs without Kueue."""
    install_workload_crd(kube)
    try:
        yield CRD_NAME
    finally:
        uninstall_workload_crd(kube)


def pods(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    items = kube.list("Pod", namespace, labels=f"finetune.dev/job-name={name}")
    return sorted(items, key=lambda p: p["metadata"]["name"])


def start_pods(kube: Kube, wait_until: WaitUntil, namespace: str, name: str) -> None:
    """Play the kubelet: the gang's two pods start, each held by a finalizer once deleted."""
    pod_list = wait_until(
        lambda: len(p := pods(kube, namespace, name)) == 2 and p, timeout=60, message="2 pods"
    )
    for pod in pod_list:
        meta = {"finalizers": [*pod["metadata"].get("finalizers", []), KUBELET_FINALIZER]}
        kube.patch("Pod", pod["metadata"]["name"], namespace, {"metadata": meta})
        patch_pod_status(kube, namespace, pod["metadata"]["name"], running_status(pod, "127.0.0.1"))


def stop_pods(kube: Kube, namespace: str, name: str) -> None:
    """Play the kubelet after SIGTERM: rank 0 saved its checkpoint and exited Interrupted (exit
    code 1, retryable), the other rank too; then the pods go."""
    pod_list = pods(kube, namespace, name)
    assert pod_list and all(p["metadata"].get("deletionTimestamp") for p in pod_list)
    for pod in pod_list:
        rank0 = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
        status = terminated_status(pod, 1, INTERRUPTED if rank0 else "")
        patch_pod_status(kube, namespace, pod["metadata"]["name"], status)
        kept = [f for f in pod["metadata"]["finalizers"] if f != KUBELET_FINALIZER]
        kube.patch("Pod", pod["metadata"]["name"], namespace, {"metadata": {"finalizers": kept}})


# A change that only a Workload shows reaches the status through the operator's Workload watch
# within a few seconds, or through the resync after 30 s (the first) or 60 s. Waiting less than
# that proves the watch: kopf had not started it for a Kueue installed after the operator.
WATCHED = 15


def wait_condition(
    kube: Kube,
    wait_until: WaitUntil,
    ns: str,
    name: str,
    type_: str,
    reason: str,
    text: str = "",
    timeout: float = 90,
) -> dict[str, Any]:
    def met() -> dict[str, Any] | None:
        found = condition(ftj_status(kube, ns, name), type_)
        ok = found.get("reason") == reason and text in found.get("message", "")
        return found if ok else None

    return wait_until(
        met,
        timeout=timeout,
        message=f"{type_} reason {reason} saying {text!r} "
        f"(now {condition(ftj_status(kube, ns, name), type_)})",
    )


def job_spec(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return (kube.get("Job", name, namespace) or {}).get("spec") or {}


def test_suspend_is_suspending_until_the_pods_stopped(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    kube.apply(ftj_manifest("sus", namespace))
    start_pods(kube, wait_until, namespace, "sus")
    wait_phase(kube, wait_until, namespace, "sus", "Running")

    kube.patch("FineTuneJob", "sus", namespace, {"spec": {"runPolicy": {"suspend": True}}})
    wait_until(lambda: job_spec(kube, namespace, "sus").get("suspend") is True, timeout=30)
    # The Job controller deleted the pods; their trainers are saving a checkpoint (SIGTERM).
    suspending = wait_condition(
        kube, wait_until, namespace, "sus", "Suspended", "Suspending", "2 pod(s) are stopping"
    )
    assert suspending["status"] == "False"
    assert ftj_status(kube, namespace, "sus")["phase"] == "Running"

    stop_pods(kube, namespace, "sus")
    status = wait_phase(kube, wait_until, namespace, "sus", "Suspended")
    suspended = condition(status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "Suspended")
    assert "pods are gone" in suspended["message"]
    # The Interrupted exits of a suspend are no failure: same attempt, the Job not failed.
    assert status["attempts"] == 1
    job_conditions = (kube.get("Job", "sus", namespace) or {})["status"].get("conditions") or []
    assert not [c for c in job_conditions if c["type"] == "Failed" and c["status"] == "True"]

    kube.patch("FineTuneJob", "sus", namespace, {"spec": {"runPolicy": {"suspend": False}}})
    wait_until(lambda: job_spec(kube, namespace, "sus").get("suspend") is False, timeout=30)
    resumed = wait_condition(kube, wait_until, namespace, "sus", "Suspended", "Resumed")
    assert "resumes from its last checkpoint" in resumed["message"]
    # The same Job (attempt 1) makes new pods, which resume from the checkpoint.
    wait_until(lambda: len(pods(kube, namespace, "sus")) == 2, timeout=60, message="new pods")
    assert ftj_status(kube, namespace, "sus")["attempts"] == 1


def test_queue_without_kueue_says_so_and_fails_nothing(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    if kube.get("CustomResourceDefinition", CRD_NAME) is not None:
        pytest.skip("this cluster has Kueue's Workload CRD")
    kube.apply(ftj_manifest("nokueue", namespace, runPolicy={"queueName": "team-a"}))
    queued = wait_condition(
        kube, wait_until, namespace, "nokueue", "Running", "Queued", "is Kueue installed?"
    )
    assert queued["message"].startswith("waiting for Kueue queue team-a")
    kube.patch("FineTuneJob", "nokueue", namespace, {"spec": {"runPolicy": {"suspend": True}}})
    status = wait_phase(kube, wait_until, namespace, "nokueue", "Suspended")
    assert "is Kueue installed?" in condition(status, "Suspended")["message"]
    assert job_spec(kube, namespace, "nokueue")["suspend"] is True


def test_queued_suspend_and_resume_go_through_the_kueue_workload(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil, workload_crd: str
) -> None:
    """Kueue's part is played by KueueStandIn (not Kueue; see the module docstring)."""
    kueue = KueueStandIn(kube, namespace)
    kube.apply(ftj_manifest("kq", namespace, runPolicy={"queueName": "team-a"}))
    wait_until(lambda: job_spec(kube, namespace, "kq").get("suspend") is True, timeout=30)
    wait_condition(
        kube, wait_until, namespace, "kq", "Running", "Queued", "has not created the Job's Workload"
    )

    # Stand-in: Kueue makes the Workload and cannot admit it yet. The operator's Workload watch
    # brings Kueue's reason into the status (the Job itself does not change).
    kueue.create_workload("kq", pending="couldn't assign flavors to pod set main: no quota")
    wait_condition(kube, wait_until, namespace, "kq", "Running", "Queued", "no quota", WATCHED)

    # Stand-in: Kueue admits it and unsuspends the Job; the pods start.
    kueue.admit("kq")
    start_pods(kube, wait_until, namespace, "kq")
    wait_phase(kube, wait_until, namespace, "kq", "Running")

    # Suspend: the operator deactivates the Workload and leaves Job.spec.suspend to Kueue.
    kube.patch("FineTuneJob", "kq", namespace, {"spec": {"runPolicy": {"suspend": True}}})
    wait_until(
        lambda: (kueue.workload("kq") or {})["spec"].get("active") is False,
        timeout=30,
        message="Workload spec.active=false",
    )
    suspending = wait_condition(
        kube, wait_until, namespace, "kq", "Suspended", "Suspending", "waiting for Kueue to evict"
    )
    assert suspending["status"] == "False"
    assert job_spec(kube, namespace, "kq")["suspend"] is False  # Kueue's to set, not ours

    # Stand-in: Kueue evicts the deactivated Workload and suspends the Job; pods get SIGTERM.
    kueue.sync("kq")
    wait_condition(
        kube, wait_until, namespace, "kq", "Suspended", "Suspending", "2 pod(s) are stopping"
    )
    stop_pods(kube, namespace, "kq")
    status = wait_phase(kube, wait_until, namespace, "kq", "Suspended")
    assert "is deactivated (spec.active=false)" in condition(status, "Suspended")["message"]
    assert status["attempts"] == 1

    # Resume: the operator activates the Workload again; it queues for admission.
    kube.patch("FineTuneJob", "kq", namespace, {"spec": {"runPolicy": {"suspend": False}}})
    wait_until(
        lambda: (kueue.workload("kq") or {})["spec"].get("active") is True,
        timeout=30,
        message="Workload spec.active=true",
    )
    wait_condition(kube, wait_until, namespace, "kq", "Suspended", "Resumed", "active again")
    kueue.sync("kq")  # Stand-in: pending again, for lack of quota
    wait_condition(
        kube, wait_until, namespace, "kq", "Running", "Queued", "insufficient unused", WATCHED
    )
    assert ftj_status(kube, namespace, "kq")["phase"] == "Pending"

    # Stand-in: admitted again; the same Job's new pods run (and resume from the checkpoint).
    kueue.admit("kq")
    start_pods(kube, wait_until, namespace, "kq")
    status = wait_phase(kube, wait_until, namespace, "kq", "Running")
    assert status["attempts"] == 1
    assert condition(status, "Suspended")["reason"] == "Resumed"
