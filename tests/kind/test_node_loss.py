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
2 resumes from the last checkpoint and finishes.

The operator is moved to the control-plane node for the test (the chart's nodeSelector and
tolerations), since a frozen operator could not see anything; it is moved back after.

In the `extended` mark (`make test-all`): the control-plane suite proves the same rules against
a real API server and node lifecycle controller (tests/controlplane/test_lost_node.py), and this
run's 4 minutes do not fit `make test`'s budget. Its figures go to kind-e2e-timings.json
(node_loss_*).
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
JOB_LABEL = "finetune.dev/job-name"
INDEX = "batch.kubernetes.io/job-completion-index"
CKPT_EVERY = 5
HANG_TIMEOUT_S = 10
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


def test_a_node_lost_under_the_gang_is_a_disruption_and_the_job_finishes(
    kube: Any,
    images: dict[str, str],
    operator_on_control_plane: None,
    test_namespace: str,
    timing: Any,
) -> None:
    ns, worker = test_namespace, worker_node(kube)
    hub = setup_hub(kube, ns, f"losttok{secrets.token_hex(16)}", timing, images)
    job = example_job(ns, hub.endpoint, NAME)
    job["spec"]["training"]["checkpointEverySteps"] = CKPT_EVERY
    job["spec"]["runPolicy"] = {"backoffLimit": 0, "hangTimeoutSeconds": HANG_TIMEOUT_S}
    kube.apply(job, ns)

    def status() -> Obj:
        return kube.json("-n", ns, "get", "finetunejob", NAME).get("status") or {}

    def pods() -> list[Obj]:
        return kube.json("-n", ns, "get", "pods", "-l", f"{JOB_LABEL}={NAME}")["items"]

    # Past a periodic checkpoint: the restart resumes from it.
    def step() -> int:
        return int((status().get("progress") or {}).get("step") or 0)

    poll(
        f"training past step {CKPT_EVERY + 1}", lambda: step() > CKPT_EVERY or None, timeout=WAIT_S
    )
    on_worker = next(p for p in pods() if p["spec"].get("nodeName") == worker)
    lost_pod = on_worker["metadata"]["name"]
    lost_rank = on_worker["metadata"]["annotations"][INDEX]
    step_at_fault = step()
    resumed_before = (status().get("checkpoints") or {}).get("lastResumeTime")
    record: Obj = {"worker": worker, "lostPod": lost_pod, "lostRank": lost_rank,
                   "stepAtFault": step_at_fault}  # fmt: skip
    t0 = time.monotonic()
    docker("pause", worker)
    try:
        seen: Obj = {}

        def disrupted() -> Obj | None:
            st = status()
            running = next((c for c in st.get("conditions", []) if c["type"] == "Running"), {})
            if "has not reported its end" in running.get("message", ""):
                seen.setdefault("waitingFrom", round(time.monotonic() - t0, 1))
            for pod in pods():
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
    t1 = time.monotonic()

    def resumed_again() -> Obj | None:
        checkpoints = status().get("checkpoints") or {}
        again = checkpoints.get("lastResumeTime") not in (None, resumed_before)
        return checkpoints if again else None

    resumed = poll("attempt 2 resumed", resumed_again, timeout=WAIT_S)
    record["thawToResumeSeconds"] = round(time.monotonic() - t1, 1)
    record["resumedFromStep"] = resumed.get("resumedFromStep") or 0
    final = poll(
        "the job to finish",
        lambda: s if (s := status()).get("phase") in ("Succeeded", "Failed") else None,
        timeout=WAIT_S,
    )
    record["final"] = {k: final.get(k) for k in ("phase", "attempts", "disruptions")}
    print(f"[node-loss] {json.dumps(record)}")
    for key in ("disruptionSeconds", "thawToResumeSeconds", "resumedFromStep"):
        timing.record(f"node_loss_{key}", record[key])
    # backoffLimit 0, and the job still finished: the lost node did not count.
    assert record["final"] == {"phase": "Succeeded", "attempts": 2, "disruptions": 1}, final
    # At most one checkpoint interval was lost.
    assert step_at_fault - resumed["resumedFromStep"] <= CKPT_EVERY, record
