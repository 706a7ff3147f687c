"""A node lost under a running gang: its restart is a disruption, and a restart held back by
its pod says so and goes on once the pod is gone.

The gang's other ranks time out waiting for the lost node's rank (CollectiveTimeout), perhaps
before the node lifecycle controller marks the node not ready (Unknown, once its kubelet was
silent for the controller's grace period). The operator waits, a short while after the failure,
for the silent pod to stop or its node to be so marked, and then counts the restart as a
disruption, outside runPolicy.backoffLimit: a job with backoffLimit 0 survives a lost node. A
silent pod whose node stays ready is counted as the failure it is. While the gang still runs,
a pod on a node marked not ready shows as Running=False, reason NodeNotReady. The nodes here are
Node objects whose heartbeat (their Lease) the test renews as a kubelet does, and stops to lose
the node: the real node lifecycle controller then marks the node Unknown and its pods not ready
(after 6 s here, hack/controlplane.sh; 50 s by default). Where the other ranks never give up
(a phase the trainer does not time), the real taint eviction controller evicts the lost node's
pod once its toleration runs out, and the operator restarts the gang as a new attempt. A node
that is deleted takes its pods at once (the pod garbage collector's doing, done here by the
test) and the Job replaces them: the operator restarts the gang from what it finds, even when it
sees only the replacement.

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
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import (
    NodeHeartbeat,
    bind_pod,
    condition,
    delete_pod_now,
    ftj_manifest,
    ftj_status,
    patch_pod_status,
    running_status,
    terminated_status,
    wait_phase,
)
from fixtures.kube import Kube
from fixtures.operator import Operator, Rank0Metrics

from finetune_api import phases
from finetune_api.constants import Reason
from finetune_operator.restarts import FORMED_SKEW_SECONDS

pytest_plugins = ["fixtures.operator"]

Obj = dict[str, Any]
NODE = "lost-node"
# Settings.stuck_terminating_seconds: seconds, not the minute a kubelet is given in a cluster.
STUCK_AFTER = 2
# Settings.node_lost_wait_seconds: past the node lifecycle controller's grace period here (6 s)
# and its monitor period (1 s), as the default 60 s is past the default 50 + 5 s.
NODE_LOST_WAIT = 15
CRASH = json.dumps({"status": "Failed", "reason": "TrainingFailed", "message": "CUDA error"})
HUNG = json.dumps(
    {"status": "Failed", "reason": "CollectiveTimeout", "message": "no step for 60 s after step 7"}
)
INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME = "finetune.dev/job-name"
# What the node lifecycle controller says of a node whose kubelet fell silent.
UNREACHABLE = "Ready=Unknown, NodeStatusUnknown: Kubelet stopped posting node status."


@pytest.fixture
def watching(
    kube: Kube, kubeconfig: str, crd: str, tmp_path: Path
) -> Iterator[tuple[str, Operator]]:
    """A namespace with an operator of its own that reports a stuck pod after STUCK_AFTER s and
    waits NODE_LOST_WAIT s for a silent pod's node to be marked not ready."""
    ns = kube.create_namespace("ftj-lost")
    env = {
        "FINETUNE_STUCK_TERMINATING_SECONDS": str(STUCK_AFTER),
        "FINETUNE_NODE_LOST_WAIT_SECONDS": str(NODE_LOST_WAIT),
        "FINETUNE_WATCH_NAMESPACES": ns,
    }
    operator = Operator(kubeconfig, tmp_path / "operator.log", env)
    operator.start()
    try:
        yield ns, operator
    finally:
        operator.stop()
        kube.delete("Namespace", ns, missing_ok=True)


@pytest.fixture
def watched(watching: tuple[str, Operator]) -> str:
    return watching[0]


@pytest.fixture
def node(kube: Kube, watched: str) -> Iterator[NodeHeartbeat]:
    """A Node, Ready while its heartbeat runs, named after the test's namespace."""
    heartbeat = NodeHeartbeat(kube, f"{watched}-node").start()
    try:
        yield heartbeat
    finally:
        heartbeat.delete()


def wide_row(kubectl: Any, ns: str, name: str) -> dict[str, str]:
    """`kubectl get ftj NAME -o wide` as {HEADER: cell}, cut at the headers' offsets: empty
    columns (PROGRESS, LOSS, ...) print as blanks."""
    header, row = kubectl("-n", ns, "get", "ftj", name, "-o", "wide").stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}


def attempt_pods(kube: Kube, ns: str, name: str, attempt: int) -> list[Obj]:
    sel = f"{JOB_NAME}={name},finetune.dev/attempt={attempt}"
    return sorted(
        kube.list("Pod", ns, labels=sel),
        key=lambda p: int(p["metadata"]["annotations"][INDEX]),
    )


def release_lost_pod(
    kube: Kube, ns: str, name: str, pod: str, wait_until: Callable[..., Any]
) -> None:
    """Remove the pod at once (grace 0), as Kubernetes' pod garbage collector does for a node
    deleted or marked out of service (this control plane runs none), and wait for attempt 2's
    pods: the restart the pod held back."""
    delete_pod_now(kube, ns, pod)
    wait_until(
        lambda: len(attempt_pods(kube, ns, name, 2)) == 2,
        timeout=60,
        message="attempt 2's pods, once the held pod is gone",
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
    bind_pod(kube, ns, rank1, NODE)
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
    cells = wide_row(kubectl, ns, name)
    assert (cells["PHASE"], cells["REASON"], cells["ATTEMPTS"], cells["DISRUPTIONS"]) == (
        "Pending",
        Reason.POD_STUCK_TERMINATING,
        "2",
        "0",
    )
    events = kube.list("Event", ns, fields=f"involvedObject.name={name}")
    warned = [e for e in events if e["reason"] == Reason.POD_STUCK_TERMINATING]
    assert [(e["type"], e["message"]) for e in warned] == [("Warning", message)]
    # Nothing was forced: the pod is still there, and attempt 1's Job still waits on it.
    pod = kube.get("Pod", rank1, ns)
    assert pod is not None and pod["metadata"].get("deletionTimestamp")
    assert not attempt_pods(kube, ns, name, 2)

    # The node is marked out of service: attempt 2 starts once the pod is gone.
    release_lost_pod(kube, ns, name, rank1, wait_until)
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


def gang_on(
    kube: Kube,
    ns: str,
    name: str,
    node: str,
    wait_until: Callable[..., Any],
    rank0_ip: str = "10.0.0.2",
    **spec: Any,
) -> list[Obj]:
    """A FineTuneJob with backoffLimit 0 (a failure that counts ends it), its attempt 1's two
    pods running, rank 1's on `node`; the operator scrapes rank 0 at `rank0_ip`."""
    run_policy = {"backoffLimit": 0, **spec.pop("runPolicy", {})}
    kube.create(ftj_manifest(name, ns, runPolicy=run_policy, **spec))
    pods = wait_until(
        lambda: len(p := attempt_pods(kube, ns, name, 1)) == 2 and p,
        timeout=60,
        message="2 pods of attempt 1",
    )
    bind_pod(kube, ns, pods[1]["metadata"]["name"], node)
    for pod, ip in zip(pods, (rank0_ip, "10.0.0.3"), strict=True):
        patch_pod_status(kube, ns, pod["metadata"]["name"], running_status(pod, ip))
    return pods


def rank_0_gives_up(kube: Kube, ns: str, rank0: Obj) -> None:
    """Rank 0 ends with CollectiveTimeout: it waited for rank 1 longer than the hang timeout."""
    patch_pod_status(kube, ns, rank0["metadata"]["name"], terminated_status(rank0, 1, HUNG))


def running_reason(kube: Kube, ns: str, name: str, reason: str) -> Callable[[], Obj | None]:
    def check() -> Obj | None:
        running = condition(ftj_status(kube, ns, name), "Running")
        return running if running.get("reason") == reason else None

    return check


def test_a_node_lost_under_the_gang_is_a_disruption_even_with_backoff_limit_0(
    kube: Kube, kubectl: Any, watched: str, node: NodeHeartbeat, wait_until: Callable[..., Any]
) -> None:
    ns, name = watched, "lost-node"
    pods = gang_on(kube, ns, name, node.name, wait_until)
    rank1 = pods[1]["metadata"]["name"]
    # Rank 1's node goes silent; rank 0 gives up waiting for it before the node is marked.
    node.stop()
    rank_0_gives_up(kube, ns, pods[0])
    waiting = wait_until(
        running_reason(kube, ns, name, Reason.RESTARTING),
        timeout=30,
        message="the failed attempt waiting on rank 1's pod",
    )["message"]
    assert f"pod {rank1} on node {node.name} has not reported its end" in waiting
    assert "no step for 60 s after step 7" in waiting
    status = ftj_status(kube, ns, name)
    assert status["attempts"] == 1 and not status.get("disruptions")
    # The node lifecycle controller marks the node, its grace period over, and its pods.
    status = wait_until(
        lambda: (s := ftj_status(kube, ns, name)).get("disruptions") and s,
        timeout=NODE_LOST_WAIT + 20,
        message="the restart counted as a disruption",
    )
    assert (status["phase"], status["attempts"], status["disruptions"]) == ("Pending", 2, 1)
    message = condition(status, "Running")["message"]
    assert message.startswith(
        f"attempt 1 was disrupted (node {node.name} of pod {rank1} is not ready ({UNREACHABLE}))"
    ), message
    assert "does not count against runPolicy.backoffLimit; starting attempt 2" in message
    cells = wide_row(kubectl, ns, name)
    assert (cells["ATTEMPTS"], cells["DISRUPTIONS"]) == ("2", "1")
    # The lost pod goes (the node deleted or marked out of service): attempt 2 starts.
    release_lost_pod(kube, ns, name, rank1, wait_until)


def test_a_silent_pod_on_a_ready_node_is_counted_after_the_wait(
    kube: Kube, watched: str, node: NodeHeartbeat, wait_until: Callable[..., Any]
) -> None:
    ns, name = watched, "hung"
    pods = gang_on(kube, ns, name, node.name, wait_until)
    rank_0_gives_up(kube, ns, pods[0])
    wait_until(
        running_reason(kube, ns, name, Reason.RESTARTING),
        timeout=30,
        message="the failed attempt waiting on rank 1's pod",
    )
    # Its node stays Ready: once the wait is over, the failure counts, and backoffLimit 0 ends
    # the job.
    status = wait_phase(kube, wait_until, ns, name, "Failed", timeout=NODE_LOST_WAIT + 20)
    failed = condition(status, "Failed")
    assert failed["reason"] == Reason.BACKOFF_LIMIT_EXCEEDED
    assert failed["message"].startswith("1 attempt(s) failed; last: ")
    assert "no step for 60 s after step 7" in failed["message"]
    assert not status.get("disruptions")


def test_a_running_gangs_node_marked_not_ready_shows_and_its_restart_needs_no_wait(
    kube: Kube, watched: str, node: NodeHeartbeat, wait_until: Callable[..., Any]
) -> None:
    ns, name = watched, "not-ready"
    pods = gang_on(kube, ns, name, node.name, wait_until)
    rank1 = pods[1]["metadata"]["name"]
    # The node stops answering while the gang trains; the node lifecycle controller marks it,
    # and its pods not ready.
    node.stop()
    running = wait_until(
        running_reason(kube, ns, name, Reason.NODE_NOT_READY),
        timeout=30,
        message="Running=False NodeNotReady",
    )
    assert running["status"] == "False"
    assert running["message"].startswith(
        f"node {node.name} of pod {rank1} is not ready ({UNREACHABLE}) since "
    ), running["message"]

    def not_ready_events() -> list[str]:
        events = kube.list("Event", ns, fields=f"involvedObject.name={name}")
        return [e["type"] for e in events if e["reason"] == Reason.NODE_NOT_READY]

    # Posted once the status is written, so it may follow the condition by a moment.
    wait_until(not_ready_events, timeout=30, message="the NodeNotReady Event")
    assert not_ready_events() == ["Warning"]
    # Rank 0 gives up on rank 1: the node is known lost, so the restart is a disruption at once.
    rank_0_gives_up(kube, ns, pods[0])
    status = wait_until(
        lambda: (s := ftj_status(kube, ns, name)).get("disruptions") and s,
        timeout=30,
        message="the restart counted as a disruption",
    )
    assert (status["phase"], status["attempts"], status["disruptions"]) == ("Pending", 2, 1)


def restarted_as_attempt_2(
    kube: Kube, ns: str, name: str, wait_until: Callable[..., Any], timeout: float
) -> str:
    """Wait for the gang's restart as attempt 2, counted as one disruption (the job goes on
    with backoffLimit 0); the restart's Event message. Running may say by then why attempt 2's
    pods wait (no node fits them here), so the Event tells what happened (the operator posts
    it after the status write)."""
    status = wait_until(
        lambda: (s := ftj_status(kube, ns, name)).get("attempts") == 2 and s,
        timeout=timeout,
        message="the gang restarted as attempt 2",
    )
    assert status["disruptions"] == 1 and status["phase"] != "Failed"

    def restart_events() -> list[str]:
        events = kube.list("Event", ns, fields=f"involvedObject.name={name}")
        return [e["message"] for e in events if e["reason"] == Reason.RESTARTING]

    # Posted once the status is written.
    (message,) = wait_until(restart_events, timeout=30, message="the restart's Event")
    return str(message)


@pytest.fixture
def ready_peer(kube: Kube, watched: str) -> Iterator[NodeHeartbeat]:
    """A second Node that stays Ready. The node lifecycle controller evicts nothing while every
    node of a zone is not ready (it takes that for the control plane's own network failing),
    as the lost node alone would be here."""
    heartbeat = NodeHeartbeat(kube, f"{watched}-peer").start()
    try:
        yield heartbeat
    finally:
        heartbeat.delete()


@pytest.mark.usefixtures("ready_peer")
def test_a_pod_evicted_from_a_lost_node_restarts_the_gang_as_a_new_attempt(
    kube: Kube, kubectl: Any, watched: str, node: NodeHeartbeat, wait_until: Callable[..., Any]
) -> None:
    """Rank 0 never gives up here, as in a phase the trainer does not time (a load, a save, a
    push), where it would wait for torch's collective timeout (30 minutes). Kubernetes evicts
    rank 1's pod once the node has been unreachable for the pod's toleration of that (300 s by
    default, which DefaultTolerationSeconds sets; 1 s here, in the spec's pod template): the
    real taint eviction controller marks it DisruptionTarget and deletes it. No kubelet
    confirms the stop, so the Job never replaces it and the gang cannot rejoin it in place:
    the operator restarts the gang as attempt 2, a disruption."""
    ns, name = watched, "evicted"
    unreachable = {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 1,
    }
    template = {"tolerations": [unreachable], "terminationGracePeriodSeconds": 1}
    pods = gang_on(kube, ns, name, node.name, wait_until, template=template)
    rank1 = pods[1]["metadata"]["name"]
    node.stop()
    message = restarted_as_attempt_2(kube, ns, name, wait_until, timeout=30)
    assert message.startswith(f"pod {rank1} was disrupted (DeletionByTaintManager"), message
    assert f"node {node.name} of pod {rank1} is not ready ({UNREACHABLE})" in message
    assert "the gang restarts as attempt 2, from its last checkpoint" in message
    evicted = kube.get("Pod", rank1, ns)
    assert evicted is not None and evicted["metadata"].get("deletionTimestamp")
    # Attempt 1's Job waits for the pod no kubelet will confirm stopped, and says so; once the
    # pod is gone (the node deleted, or marked out of service), attempt 2 starts.
    wait_until(
        running_reason(kube, ns, name, Reason.POD_STUCK_TERMINATING),
        timeout=30,
        message="the restart reported held by rank 1's pod",
    )
    cells = wide_row(kubectl, ns, name)
    assert (cells["ATTEMPTS"], cells["DISRUPTIONS"]) == ("2", "1")
    release_lost_pod(kube, ns, name, rank1, wait_until)


def remove_like_pod_gc(kube: Kube, ns: str, pod: str) -> None:
    """What the pod garbage collector does to each pod of a deleted Node (this control plane
    runs none): mark it Failed with DisruptionTarget (DeletionByPodGC), then delete it at once."""
    gone = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "DeletionByPodGC",
        "message": "PodGC: node no longer exists",
        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    patch_pod_status(kube, ns, pod, {"phase": "Failed", "conditions": [gone]})
    delete_pod_now(kube, ns, pod)


def a_formed_gang(
    kube: Kube,
    ns: str,
    name: str,
    wait_until: Callable[..., Any],
    rank0_metrics: Rank0Metrics,
    **spec: Any,
) -> list[Obj]:
    """gang_on, with rank 0's stand-in saying that its gang formed a second after its pods were
    made (by the whole seconds they carry), and its progress scraped."""
    pods = gang_on(kube, ns, name, NODE, wait_until, rank0_ip=rank0_metrics.ip, **spec)
    formed = datetime.fromisoformat(pods[0]["metadata"]["creationTimestamp"]).timestamp() + 1
    stamps = {phases.PROCESS_STARTED: formed - 1, phases.RENDEZVOUS: formed}
    rank0_metrics.set(step=12, total=100, resumed=0, resumed_at=formed, stamps=stamps)
    wait_until(
        lambda: ftj_status(kube, ns, name).get("progress", {}).get("step") == 12,
        timeout=60,
        message="rank 0's progress, scraped",
    )
    return pods


def replaced_while_away(
    kube: Kube,
    ns: str,
    operator: Operator,
    pods: list[Obj],
    index: int,
    wait_until: Callable[..., Any],
) -> Obj:
    """With the operator stopped, the pod of `index` removed as the pod garbage collector does,
    and the real Job controller's replacement for it; the operator still stopped."""
    operator.stop()
    gone = pods[index]["metadata"]["name"]
    # A replacement comes the pod garbage collector's 40 s quarantine after its node went, at
    # the least: later than the skew the operator allows between rank 0's clock and the API
    # server's.
    made = datetime.fromisoformat(pods[0]["metadata"]["creationTimestamp"]).timestamp()
    time.sleep(max(made + FORMED_SKEW_SECONDS + 2 - time.time(), 0))
    remove_like_pod_gc(kube, ns, gone)
    name = pods[0]["metadata"]["labels"][JOB_NAME]
    replacement = wait_until(
        lambda: next(
            (
                p
                for p in attempt_pods(kube, ns, name, 1)
                if p["metadata"]["annotations"][INDEX] == str(index)
                and p["metadata"]["name"] != gone
            ),
            None,
        ),
        timeout=60,
        message=f"the Job controller's replacement for index {index}",
    )
    # Gone once the Job controller has counted it (and lifted its tracking finalizer).
    wait_until(lambda: kube.get("Pod", gone, ns) is None, timeout=30, message="the pod gone")
    return replacement


def made_after_the_gang(replacement: Obj) -> str:
    """How the operator names a replacement made after the gang formed (restarts.GONE_UNSEEN's
    evidence), up to the formation's time."""
    meta = replacement["metadata"]
    return f"pod {meta['name']} was made at {meta['creationTimestamp']}, after the gang formed at "


def test_a_pod_removed_with_its_deleted_node_unseen_restarts_the_gang(
    kube: Kube,
    watching: tuple[str, Operator],
    wait_until: Callable[..., Any],
    rank0_metrics: Rank0Metrics,
) -> None:
    """Rank 1's node is deleted (by a cloud's node controller, an autoscaler, or kubectl) while
    the operator is away: the pod garbage collector removes its pod, and the real Job
    controller replaces it, since its DisruptionTarget is one the Job's podFailurePolicy
    ignores. Rank 1 left without the gang saving, so nothing rejoins the replacement, and rank 0
    would wait for rank 1 in its collectives. The operator, back, sees only the replacement:
    a pod made after rank 0's gang formed (its rendezvous stamp) beside a pod it formed with.
    It restarts the gang as attempt 2, a disruption."""
    (ns, operator), name = watching, "node-deleted"
    pods = a_formed_gang(kube, ns, name, wait_until, rank0_metrics)
    replacement = replaced_while_away(kube, ns, operator, pods, 1, wait_until)
    # Its kubelet starts it, on another node.
    patch_pod_status(
        kube, ns, replacement["metadata"]["name"], running_status(replacement, "10.0.0.4")
    )
    operator.start()
    message = restarted_as_attempt_2(kube, ns, name, wait_until, timeout=60)
    assert message.startswith(made_after_the_gang(replacement)), message
    assert "the pod it replaces went without the gang stopping with it" in message
    assert "the gang restarts as attempt 2, from its last checkpoint" in message
    wait_until(
        lambda: len(attempt_pods(kube, ns, name, 2)) == 2,
        timeout=60,
        message="attempt 2's pods",
    )


def test_a_failure_after_a_member_removed_unseen_is_a_disruption(
    kube: Kube,
    watching: tuple[str, Operator],
    wait_until: Callable[..., Any],
    rank0_metrics: Rank0Metrics,
) -> None:
    """As above, and rank 0 gives up waiting for rank 1 (CollectiveTimeout) before the operator
    is back, so the Job has failed: rank 0's result carries when its gang formed, which dates
    the replacement as one for a member that left unseen. The failure is that disruption's, and
    backoffLimit 0 does not end the job."""
    (ns, operator), name = watching, "node-deleted-then-hung"
    pods = a_formed_gang(kube, ns, name, wait_until, rank0_metrics)
    replacement = replaced_while_away(kube, ns, operator, pods, 1, wait_until)
    formed = datetime.fromisoformat(pods[0]["metadata"]["creationTimestamp"]).timestamp() + 1
    hung = {**json.loads(HUNG), "phases": {phases.RENDEZVOUS: formed}}
    patch_pod_status(
        kube, ns, pods[0]["metadata"]["name"], terminated_status(pods[0], 1, json.dumps(hung))
    )
    wait_until(
        lambda: any(
            c["type"] in ("Failed", "FailureTarget") and c["status"] == "True"
            for c in (kube.get("Job", name, ns) or {}).get("status", {}).get("conditions", [])
        ),
        timeout=30,
        message="the Job failed",
    )
    operator.start()
    message = restarted_as_attempt_2(kube, ns, name, wait_until, timeout=60)
    assert message.startswith(f"attempt 1 was disrupted ({made_after_the_gang(replacement)}"), (
        message
    )
    assert "does not count against runPolicy.backoffLimit; starting attempt 2" in message


def test_rank_0s_pod_removed_unseen_restarts_the_gang_once_its_replacement_waits_too_long(
    kube: Kube,
    watching: tuple[str, Operator],
    wait_until: Callable[..., Any],
    rank0_metrics: Rank0Metrics,
) -> None:
    """The same for rank 0's own pod: its replacement is rank 0, whose new process waits for a
    gang that never forms (rank 1 waits in the old gang's collectives). A rank 1 that had saved
    with the old rank 0 would have rejoined within seconds; past runPolicy.hangTimeoutSeconds
    (10 s here, and 10 s for the clocks) the operator restarts the gang as attempt 2."""
    (ns, operator), name = watching, "rank0-deleted"
    pods = a_formed_gang(
        kube, ns, name, wait_until, rank0_metrics, runPolicy={"hangTimeoutSeconds": 10}
    )
    replacement = replaced_while_away(kube, ns, operator, pods, 0, wait_until)
    # Its kubelet starts it: its process serves its metrics at once, and waits for its gang.
    started = time.time()
    rank0_metrics.set(step=12, total=100, stamps={phases.PROCESS_STARTED: started})
    patch_pod_status(
        kube, ns, replacement["metadata"]["name"], running_status(replacement, rank0_metrics.ip)
    )
    operator.start()
    message = restarted_as_attempt_2(kube, ns, name, wait_until, timeout=90)
    assert time.time() - started > 10 + FORMED_SKEW_SECONDS
    assert message.startswith(
        f"pod {replacement['metadata']['name']} (rank 0) was made at "
        f"{replacement['metadata']['creationTimestamp']}, after the rest of the gang, and has "
        "waited "
    ), message
    assert "the gang restarts as attempt 2, from its last checkpoint" in message
