"""A standby operator (the chart's `replicaCount: 2`) takes over when the acting pod is deleted.

    pytest -m kind tests/kind/test_operator_standby.py     # fixtures: tests/kind/conftest.py

The suite's release is scaled to two pods with `helm upgrade --reuse-values`, which changes no
pod template, so the acting pod stays. The second pod stands by: Ready (its probe answers
`standby`), scraped with finetune_operator_leader 0, acting on nothing. Then the acting pod is
deleted, as a drain or an eviction deletes it, and a FineTuneJob is created at the same moment:
the standby takes the Lease as the old pod releases it at its exit, and writes that job's status,
without waiting for a new pod to be scheduled and started; the ReplicaSet's replacement for the
deleted pod becomes the new standby. (When the old pod's shutdown outlasts the replacement's
start, both try for the Lease and either may win: the figures record which did.) The release
goes back to one pod at the end.

The seconds from the deletion to the standby leading and to the new job's status are recorded
(kind-e2e-timings.json: standby_delete_to_leading, standby_delete_to_status, and
standby_taken_by: standby or replacement), and from the
scale-down to the removed pod gone (standby_scale_down_to_pod_gone: a standby stops at SIGTERM);
the fault suite records the same restart without a standby (faults_operator_delete_to_ready).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kind_tools import is_ready, poll
from test_e2e import example_job

from finetune_api.constants import Reason
from finetune_operator.standby import BODY as STANDBY

pytestmark = [pytest.mark.kind]

Obj = dict[str, Any]
WAIT_S = 180
# The chart's defaults: the operator's metrics and liveness ports.
METRICS_PORT, HEALTHZ_PORT = 8000, 8080


def operator_pods(kube: Any, release: dict[str, str]) -> list[Obj]:
    """The operator pods that run and are not being deleted, oldest first."""
    pods = kube.json("-n", release["namespace"], "get", "pods", "-l", release["selector"])["items"]
    live = [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    return sorted(live, key=lambda p: p["metadata"]["creationTimestamp"])


def pod_get(kube: Any, release: dict[str, str], pod: str, port: int, path: str) -> str | None:
    """GET a pod's port through the API server's pod proxy; None unless it answers 200."""
    url = f"/api/v1/namespaces/{release['namespace']}/pods/{pod}:{port}/proxy/{path}"
    return kube("get", "--raw", url, check=False, timeout=30) or None


def leader_gauge(kube: Any, release: dict[str, str], pod: str) -> float | None:
    metrics = pod_get(kube, release, pod, METRICS_PORT, "metrics") or ""
    prefix = "finetune_operator_leader "
    values = [line.split()[1] for line in metrics.splitlines() if line.startswith(prefix)]
    return float(values[0]) if values else None


def lease(kube: Any, release: dict[str, str]) -> Obj:
    """The release's Lease: named after its fullname, as the Deployment is."""
    return kube.json("-n", release["namespace"], "get", "lease", release["deployment"])


def holder(kube: Any, release: dict[str, str]) -> str:
    """The pod that holds the Lease (client-go's identity: the pod's name, `_`, a suffix)."""
    return str(lease(kube, release)["spec"].get("holderIdentity") or "").rsplit("_", 1)[0]


@pytest.fixture
def two_replicas(
    kube: Any,
    operator_release: dict[str, str],
    upgrade_release: Callable[..., None],
    timing: Any,
) -> Iterator[None]:
    upgrade_release("--reuse-values", "--set", "replicaCount=2")
    try:
        yield
    finally:
        t_scale = time.monotonic()
        upgrade_release("--reuse-values", "--set", "replicaCount=1")
        # The pod removed is gone in seconds, not its 30 s grace period: a standby, PID 1 of its
        # container, stops at SIGTERM although kopf never ran to handle it.
        release = operator_release
        poll(
            "the removed operator pod gone",
            lambda: (
                len(
                    kube.json("-n", release["namespace"], "get", "pods", "-l", release["selector"])[
                        "items"
                    ]
                )
                == 1
                or None
            ),
            timeout=WAIT_S,
        )
        timing.record("standby_scale_down_to_pod_gone", time.monotonic() - t_scale)

        # One pod is left, and it acts (the ReplicaSet removes the newest pod, the standby; had
        # it removed the leader, the standby would take over): the suite's later tests need it.
        def one_acting() -> bool | None:
            pods = operator_pods(kube, operator_release)
            name = pods[0]["metadata"]["name"] if len(pods) == 1 else None
            return (name is not None and holder(kube, operator_release) == name) or None

        poll("one operator pod, holding the Lease", one_acting, timeout=WAIT_S)


def test_a_standby_takes_over_when_the_operator_pod_is_deleted(
    kube: Any,
    operator_release: dict[str, str],
    two_replicas: None,
    test_namespace: str,
    timing: Any,
) -> None:
    release = operator_release

    def both_ready() -> list[Obj] | None:
        pods = operator_pods(kube, release)
        return pods if len(pods) == 2 and all(map(is_ready, pods)) else None

    pods = poll("two Ready operator pods", both_ready, timeout=WAIT_S)
    names = [p["metadata"]["name"] for p in pods]
    leader = holder(kube, release)
    assert leader in names, (leader, names)
    (standby,) = set(names) - {leader}
    # The scale-up restarted nothing: the acting pod is the older one, and it kept acting.
    assert names[0] == leader
    # The standby is Ready because it answers its probe as a standby, and it says it does not
    # lead; kopf answers the leader's probe.
    assert pod_get(kube, release, standby, HEALTHZ_PORT, "healthz") == STANDBY.decode()
    assert pod_get(kube, release, leader, HEALTHZ_PORT, "healthz") not in (None, STANDBY.decode())
    assert (leader_gauge(kube, release, leader), leader_gauge(kube, release, standby)) == (1, 0)
    # The two pods run on different nodes where they can (the chart's default spread).
    nodes = {p["spec"]["nodeName"] for p in pods}
    record: Obj = {"nodes": len(nodes)}

    # Delete the acting pod (graceful, as a drain or an eviction does) and create a job at once.
    job = example_job(test_namespace, "http://hub.invalid:8080", name="after-failover")
    t_fault = time.monotonic()
    kube("-n", release["namespace"], "delete", "pod", leader, "--wait=false")
    kube.apply(job, test_namespace)

    # Another pod takes the Lease once the deleted one releases it at its exit. The standby,
    # trying every 2 s, is the one unless the deleted pod's shutdown (kopf finishing its
    # handlers) outlasts the start of the ReplicaSet's replacement pod: then both try, and either
    # may win, as any candidate may (seen once, on a cluster just restarted).
    def taken() -> str | None:
        now = holder(kube, release)
        return now if now not in ("", leader) else None

    acting = poll("another pod holding the Lease", taken, timeout=WAIT_S)
    record["deleteToLeading"] = round(time.monotonic() - t_fault, 1)
    record["takenBy"] = "standby" if acting == standby else "replacement"

    # It acts: the new job's status is written, its first pass having found no token Secret.
    def status() -> Obj | None:
        ftj = kube.json("-n", test_namespace, "get", "finetunejob", job["metadata"]["name"])
        st = ftj.get("status") or {}
        reasons = {c.get("reason") for c in st.get("conditions") or []}
        return (
            st if st.get("observedGeneration") == 1 and Reason.SECRET_NOT_FOUND in reasons else None
        )

    poll("the new leader's status for the new job", status, timeout=WAIT_S)
    record["deleteToStatus"] = round(time.monotonic() - t_fault, 1)
    assert leader_gauge(kube, release, acting) == 1

    # The ReplicaSet replaced the deleted pod: two pods again, the other one standing by.
    def the_other() -> str | None:
        pods = operator_pods(kube, release)
        others = [p for p in pods if p["metadata"]["name"] not in (leader, acting)]
        if len(pods) != 2 or len(others) != 1 or not is_ready(others[0]):
            return None
        return str(others[0]["metadata"]["name"])

    other = poll("the other pod standing by", the_other, timeout=WAIT_S)
    assert pod_get(kube, release, other, HEALTHZ_PORT, "healthz") == STANDBY.decode()
    assert leader_gauge(kube, release, other) == 0
    assert holder(kube, release) == acting
    record["leaseTransitions"] = lease(kube, release)["spec"].get("leaseTransitions")
    timing.record("standby_delete_to_leading", record["deleteToLeading"])
    timing.record("standby_delete_to_status", record["deleteToStatus"])
    timing.record("standby_taken_by", record["takenBy"])
    print(f"[standby] {json.dumps(record)}")
