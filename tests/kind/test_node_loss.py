"""A node lost under a training gang, on real kubelets: the restart is a disruption, and a job
with `backoffLimit: 0` finishes.

    pytest -m "kind and extended" -s tests/kind/test_node_loss.py     # or: make test-all

The worker node's container is frozen (`docker pause`): its kubelet, its containerd and the rank
on it stop at once, as on a node that lost power or its network. The rank on the control-plane
node gives up after `hangTimeoutSeconds` (CollectiveTimeout), and the node lifecycle controller
marks the worker's Ready condition Unknown once its kubelet has been silent for the controller's
grace period (50 s): later than the rank gave up, so the operator waits for it
(`FINETUNE_NODE_LOST_WAIT_SECONDS`, 60) and then counts the restart as a disruption. The worker
is then thawed, as a node that comes back; its kubelet confirms the old pod's stop, and attempt
2 resumes from the last checkpoint and finishes. In the second test the frozen worker is also
deleted, and the rank left behind does not give up: the pod garbage collector and the Job
controller replace the lost pod, and the operator restarts the gang from what it sees of that.

The operator is moved to the control-plane node for the test (the chart's nodeSelector and
tolerations), since a frozen operator could not see anything; it is moved back after.

In the `extended` mark (`make test-all`): the control-plane suite proves the same rules against
a real API server and node lifecycle controller (tests/controlplane/test_lost_node.py), and this
runs' minutes do not fit `make test`'s budget. Their figures go to kind-e2e-timings.json
(node_loss_*, node_deleted_*).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import kind_tools
import pytest
from kind_tools import CONTROL_PLANE, poll, worker_node
from test_e2e import example_job, setup_hub

from finetune_api.constants import Reason

pytestmark = [pytest.mark.kind, pytest.mark.extended]

Obj = dict[str, Any]
NAME = "node-loss"
DELETED = "node-deleted"
JOB_LABEL = "finetune.dev/job-name"
INDEX = "batch.kubernetes.io/job-completion-index"
CKPT_EVERY = 5
HANG_TIMEOUT_S = 10
# Longer than the test: the rank left behind never gives up on its own.
PATIENT_HANG_TIMEOUT_S = 900
WAIT_S = 300


@pytest.fixture
def operator_on_control_plane(restore_release: None, upgrade_release: Callable[..., None]) -> None:
    """The operator's pod on the control-plane node, for this test (restore_release moves it
    back after)."""
    toleration = [{"key": CONTROL_PLANE, "operator": "Exists", "effect": "NoSchedule"}]
    upgrade_release(
        "--reuse-values",
        "--set-json", f"nodeSelector={json.dumps({CONTROL_PLANE: ''})}",
        "--set-json", f"tolerations={json.dumps(toleration)}",
    )  # fmt: skip


def docker(*args: str) -> None:
    kind_tools.run([kind_tools.DOCKER, *args], timeout=60)


def ftj_status(kube: Any, ns: str, name: str) -> Obj:
    return kube.json("-n", ns, "get", "finetunejob", name).get("status") or {}


def gang_pods(kube: Any, ns: str, name: str) -> list[Obj]:
    return kube.json("-n", ns, "get", "pods", "-l", f"{JOB_LABEL}={name}")["items"]


def train_past_a_checkpoint(kube: Any, ns: str, job: Obj) -> Obj:
    """Apply `job` and wait until it trains past its first periodic checkpoint (the restart
    resumes from it); the pod of the gang on the worker node, and what was known then."""
    name = job["metadata"]["name"]
    job["spec"]["training"]["checkpointEverySteps"] = CKPT_EVERY
    kube.apply(job, ns)

    def step() -> int:
        return int((ftj_status(kube, ns, name).get("progress") or {}).get("step") or 0)

    poll(f"training past step {CKPT_EVERY + 1}", lambda: step() > CKPT_EVERY or None, WAIT_S)
    worker = worker_node(kube)
    on_worker = next(p for p in gang_pods(kube, ns, name) if p["spec"].get("nodeName") == worker)
    return {
        "worker": worker,
        "lostPod": on_worker["metadata"]["name"],
        "lostRank": on_worker["metadata"]["annotations"][INDEX],
        "stepAtFault": step(),
        "resumedBefore": (ftj_status(kube, ns, name).get("checkpoints") or {}).get(
            "lastResumeTime"
        ),
    }


def finish_after_the_restart(
    kube: Any, ns: str, name: str, record: Obj, since: tuple[str, float]
) -> None:
    """Attempt 2 resumes (the seconds from `since`, a (record key, monotonic time), into the
    record) and the job succeeds with backoffLimit 0: the lost node did not count, and at most
    one checkpoint interval was lost."""

    def resumed_again() -> Obj | None:
        checkpoints = ftj_status(kube, ns, name).get("checkpoints") or {}
        again = checkpoints.get("lastResumeTime") not in (None, record["resumedBefore"])
        return checkpoints if again else None

    resumed = poll("attempt 2 resumed", resumed_again, timeout=WAIT_S)
    key, t_back = since
    record[key] = round(time.monotonic() - t_back, 1)
    record["resumedFromStep"] = resumed.get("resumedFromStep") or 0
    final = poll(
        "the job to finish",
        lambda: (
            s if (s := ftj_status(kube, ns, name)).get("phase") in ("Succeeded", "Failed") else None
        ),
        timeout=WAIT_S,
    )
    record["final"] = {k: final.get(k) for k in ("phase", "attempts", "disruptions")}
    print(f"[node-loss] {json.dumps(record)}")
    assert record["final"] == {"phase": "Succeeded", "attempts": 2, "disruptions": 1}, final
    assert record["stepAtFault"] - record["resumedFromStep"] <= CKPT_EVERY, record


def test_a_node_lost_under_the_gang_is_a_disruption_and_the_job_finishes(
    kube: Any,
    images: dict[str, str],
    operator_on_control_plane: None,
    test_namespace: str,
    timing: Any,
) -> None:
    ns = test_namespace
    hub = setup_hub(kube, ns, f"losttok{secrets.token_hex(16)}", timing, images)
    job = example_job(ns, hub.endpoint, NAME)
    job["spec"]["runPolicy"] = {"backoffLimit": 0, "hangTimeoutSeconds": HANG_TIMEOUT_S}
    record = train_past_a_checkpoint(kube, ns, job)
    worker, lost_pod = record["worker"], record["lostPod"]
    t0 = time.monotonic()
    docker("pause", worker)
    try:
        seen: Obj = {}

        def disrupted() -> Obj | None:
            st = ftj_status(kube, ns, NAME)
            running = next((c for c in st.get("conditions", []) if c["type"] == "Running"), {})
            if "has not reported its end" in running.get("message", ""):
                seen.setdefault("waitingFrom", round(time.monotonic() - t0, 1))
            for pod in gang_pods(kube, ns, NAME):
                for cs in pod["status"].get("containerStatuses") or []:
                    ended = (cs.get("state") or {}).get("terminated") or {}
                    if cs["name"] == "trainer" and ended.get("message"):
                        seen.setdefault("survivorResult", json.loads(ended["message"]))
            return st if st.get("disruptions") else None

        st = poll("the restart counted as a disruption", disrupted, timeout=WAIT_S)
        record["disruptionSeconds"] = round(time.monotonic() - t0, 1)
        record.update(seen)
        running = next(c for c in st["conditions"] if c["type"] == "Running")
        record["message"] = running["message"]
        assert (st["attempts"], st["disruptions"]) == (2, 1), st
        assert running["reason"] == Reason.RESTARTING, running
        assert f"node {worker} of pod {lost_pod} is not ready (Ready=Unknown" in running["message"]
        # The survivor gave up on its silent peer: that ended the attempt.
        assert seen.get("survivorResult", {}).get("reason") == Reason.COLLECTIVE_TIMEOUT, seen
        node = kube.json("get", "node", worker)
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "Unknown", ready
    finally:
        docker("unpause", worker)
    finish_after_the_restart(kube, ns, NAME, record, ("thawToResumeSeconds", time.monotonic()))
    for key in ("disruptionSeconds", "thawToResumeSeconds", "resumedFromStep"):
        timing.record(f"node_loss_{key}", record[key])


def on_the_control_plane() -> Obj:
    """Pod spec fields that put a pod on kind's control-plane node, which stays."""
    return {
        "nodeSelector": {CONTROL_PLANE: ""},
        "tolerations": [{"key": CONTROL_PLANE, "operator": "Exists", "effect": "NoSchedule"}],
    }


def register_again(kube: Any, saved: Obj) -> None:
    """The deleted Node made again as it was (its name, labels, annotations and pod CIDR), for
    its kubelet to take up. Left to register itself, the kubelet would get the next free pod
    CIDR, and this cluster's routes and bridge (hack/kind/cluster.sh network) the old one."""
    meta, spec = saved["metadata"], saved["spec"]
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {k: meta[k] for k in ("name", "labels", "annotations") if k in meta},
        "spec": {k: spec[k] for k in ("podCIDR", "podCIDRs", "providerID") if k in spec},
    }
    kube("create", "-f", "-", input=json.dumps(node))


def node_ready(kube: Any, name: str) -> bool:
    found = kube.json("get", "nodes")["items"]
    node = next((n for n in found if n["metadata"]["name"] == name), None)
    conditions = (node or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_a_deleted_nodes_pod_is_replaced_and_the_gang_restarts_without_its_hang_timeout(
    kube: Any,
    images: dict[str, str],
    operator_on_control_plane: None,
    test_namespace: str,
    timing: Any,
) -> None:
    """The worker node dies (`docker pause`) and is deleted, as a cloud's node controller
    deletes the Node of a VM that is gone. The real pod garbage collector removes its pod (after
    its 40 s quarantine) and the real Job controller makes a replacement, which cannot be
    scheduled until the node is back (one pod per node). The rank left on the control-plane
    node does not give up: its hang timeout (900 s) stands for a phase the trainer does not time
    (a load, a save, the push), where it would wait for torch's 30-minute timeout. The operator
    restarts the gang as attempt 2, a disruption, from the pod marked DeletionByPodGC or, when
    no pass saw it, from its replacement, made after rank 0's gang formed. The Node is then made
    again as it was and its kubelet restarted, attempt 2 trains on both nodes again, and the
    job succeeds with backoffLimit 0. The Hub double runs on the
    control-plane node, which stays."""
    ns, name = test_namespace, DELETED
    token = f"deltok{secrets.token_hex(16)}"
    hub = setup_hub(kube, ns, token, timing, images, placement=on_the_control_plane())
    job = example_job(ns, hub.endpoint, name)
    job["spec"]["runPolicy"] = {"backoffLimit": 0, "hangTimeoutSeconds": PATIENT_HANG_TIMEOUT_S}
    record = train_past_a_checkpoint(kube, ns, job)
    worker = record["worker"]
    t0 = time.monotonic()
    saved = kube.json("get", "node", worker)
    docker("pause", worker)
    try:
        kube("delete", "node", worker, "--wait=false")
        st = poll(
            "the gang restarted as attempt 2",
            lambda: s if (s := ftj_status(kube, ns, name)).get("attempts") == 2 else None,
            timeout=WAIT_S,
        )
        record["restartSeconds"] = round(time.monotonic() - t0, 1)
        assert st.get("disruptions") == 1 and st.get("phase") != "Failed", st
        events = kube.json("-n", ns, "get", "events", "--field-selector",
                           f"involvedObject.name={name}")["items"]  # fmt: skip
        (message,) = [e["message"] for e in events if e["reason"] == Reason.RESTARTING]
        record["message"] = message
        record["seen"] = "replacement" if "after the gang formed" in message else "removed pod"
        assert "its rank stopped before the gang could save" in message, message
        assert "the gang restarts as attempt 2, from its last checkpoint" in message, message
    finally:
        register_again(kube, saved)
        docker("unpause", worker)
        docker("exec", worker, "systemctl", "restart", "kubelet")
        poll(
            f"node {worker} registered and Ready", lambda: node_ready(kube, worker) or None, WAIT_S
        )
    since = ("registeredToResumeSeconds", time.monotonic())
    finish_after_the_restart(kube, ns, name, record, since)
    for key in ("restartSeconds", "registeredToResumeSeconds", "resumedFromStep"):
        timing.record(f"node_deleted_{key}", record[key])
