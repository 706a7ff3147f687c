"""A restart held back by a pod on a node that stopped answering says so, and goes on once the
pod is gone.

A failed attempt's Job is deleted in the foreground: it stays until its pods are gone, and the
next attempt waits for it, so that two gangs never train at once. A pod on a lost node (dead,
shut down, cut off from the control plane) is never confirmed stopped by its kubelet and stays
Terminating until someone deletes the Node or marks it out of service. Here that node is
`lost-node`, to which the test binds rank 1's pod: this control plane has no kubelet, so nothing
ever confirms that pod's stop, as on a lost node. The operator must say what holds the restart
and what to do (reason PodStuckTerminating, with a Warning Event) instead of showing
`Restarting` for ever, and start the next attempt once the pod is gone. The removal is the test's
force delete (grace 0), as the pod garbage collector does for a node marked out of service; this
control plane runs no pod garbage collector.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import (
    condition,
    ftj_manifest,
    ftj_status,
    patch_pod_status,
    running_status,
    terminated_status,
)
from fixtures.kube import Kube
from fixtures.operator import Operator

from finetune_api.constants import Reason

pytest_plugins = ["fixtures.operator"]

Obj = dict[str, Any]
NODE = "lost-node"
# Settings.stuck_terminating_seconds: seconds, not the minute a kubelet is given in a cluster.
STUCK_AFTER = 2
CRASH = json.dumps({"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error"})


@pytest.fixture
def watched(kube: Kube, kubeconfig: str, crd: str, tmp_path: Path) -> Iterator[str]:
    """A namespace with an operator of its own that reports a stuck pod after STUCK_AFTER s."""
    ns = kube.create_namespace("ftj-stuck")
    operator = Operator(
        kubeconfig,
        tmp_path / "operator.log",
        {"FINETUNE_STUCK_TERMINATING_SECONDS": str(STUCK_AFTER), "FINETUNE_WATCH_NAMESPACES": ns},
    )
    operator.start()
    try:
        yield ns
    finally:
        operator.stop()
        kube.delete("Namespace", ns, missing_ok=True)


def attempt_pods(kube: Kube, ns: str, name: str, attempt: int) -> list[Obj]:
    sel = f"finetune.dev/job-name={name},finetune.dev/attempt={attempt}"
    return sorted(
        kube.list("Pod", ns, labels=sel),
        key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]),
    )


def test_a_restart_held_by_a_pod_on_a_lost_node_says_so_then_goes_on(
    kube: Kube, kubectl: Any, watched: str, wait_until: Callable[..., Any]
) -> None:
    ns, name = watched, "lost"
    # A short grace period: the pod counts as stuck 1 + STUCK_AFTER seconds after its deletion.
    kube.create(ftj_manifest(name, ns, template={"terminationGracePeriodSeconds": 1}))
    first = wait_until(
        lambda: len(p := attempt_pods(kube, ns, name, 1)) == 2 and p,
        timeout=60,
        message="2 pods of attempt 1",
    )
    # Rank 1 runs on lost-node, whose kubelet then stops answering.
    rank1 = first[1]["metadata"]["name"]
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": rank1},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
    }
    kube.request("POST", kube.path("Pod", ns, rank1) + "/binding", binding)
    patch_pod_status(kube, ns, rank1, running_status(first[1], "10.0.0.2"))
    # Rank 0 crashes (retryable): attempt 1 fails, and the operator deletes its Job for attempt 2.
    patch_pod_status(kube, ns, first[0]["metadata"]["name"], terminated_status(first[0], 1, CRASH))

    def held() -> Obj | None:
        running = condition(ftj_status(kube, ns, name), "Running")
        return running if running.get("reason") == Reason.POD_STUCK_TERMINATING else None

    running = wait_until(held, timeout=60, message="the restart reported held by rank 1's pod")
    message = running["message"]
    assert message.startswith(f"pod {rank1} on node {NODE} of attempt 1 is still terminating")
    assert "attempt 2 starts once it is gone" in message
    assert f"kubectl delete node {NODE}" in message
    assert f"kubectl taint nodes {NODE} node.kubernetes.io/out-of-service" in message
    status = ftj_status(kube, ns, name)
    assert (status["phase"], status["attempts"]) == ("Pending", 2)
    # `kubectl get ftj -o wide` says why, without a describe.
    header, row = kubectl("-n", ns, "get", "ftj", name, "-o", "wide").stdout.splitlines()
    # Cut at the headers' offsets: empty columns (PROGRESS, LOSS, ...) print as blanks.
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    cells = {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}
    assert (cells["PHASE"], cells["REASON"], cells["ATTEMPTS"]) == (
        "Pending",
        Reason.POD_STUCK_TERMINATING,
        "2",
    )
    events = kube.list("Event", ns, fields=f"involvedObject.name={name}")
    warned = [e for e in events if e["reason"] == Reason.POD_STUCK_TERMINATING]
    assert [(e["type"], e["message"]) for e in warned] == [("Warning", message)]
    # Nothing was forced: the pod is still there, and attempt 1's Job still waits on it.
    pod = kube.get("Pod", rank1, ns)
    assert pod is not None and pod["metadata"].get("deletionTimestamp")
    assert not attempt_pods(kube, ns, name, 2)

    # The node is marked out of service: Kubernetes' pod garbage collector deletes its pods at
    # once (grace 0), as the test does here.
    delete_now = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    kube.request("DELETE", kube.path("Pod", ns, rank1), delete_now)
    wait_until(
        lambda: len(attempt_pods(kube, ns, name, 2)) == 2,
        timeout=60,
        message="attempt 2's pods, once the held pod is gone",
    )
    running = wait_until(
        lambda: (
            (c := condition(ftj_status(kube, ns, name), "Running"))["reason"]
            != Reason.POD_STUCK_TERMINATING
            and c
        ),
        timeout=30,
        message="Running moving on from PodStuckTerminating",
    )
    assert running["status"] == "False"
