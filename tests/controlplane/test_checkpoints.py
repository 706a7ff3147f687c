"""Durable checkpoints on a real API server: the claim a one-node gang gets from the default
StorageClass, a restart that reports the step it resumed from and the steps it lost, a foreign
claim left alone, and the Warning when nothing durable can be had.

No kubelet runs here: the tests report pod status as a kubelet would, and a local HTTP server
plays rank 0's metrics endpoint (on the pod IP the tests report, `Rank0Metrics.ip`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fixtures.cluster import ftj_manifest, patch_pod_status, running_status
from fixtures.kube import Kube
from test_operator import condition, finish_pods, ftj_status, get, wait_pods

if TYPE_CHECKING:
    from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]

Kube.register("PersistentVolumeClaim", "v1", "persistentvolumeclaims")
Kube.register("StorageClass", "storage.k8s.io/v1", "storageclasses", namespaced=False)
DEFAULT_CLASS = "finetune-test-default"
ONE_NODE = {"nodes": 1}


@pytest.fixture
def default_storage_class(kube: Kube) -> Iterator[str]:
    """A StorageClass marked default, as kind's `standard` is (nothing provisions it here)."""
    kube.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": DEFAULT_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "example.com/none",
            "volumeBindingMode": "WaitForFirstConsumer",
        }
    )
    yield DEFAULT_CLASS
    kube.delete("StorageClass", DEFAULT_CLASS)


def run_pods(kube: Kube, namespace: str, pods: list[dict[str, Any]], ip: str) -> None:
    for pod in pods:
        patch_pod_status(kube, namespace, pod["metadata"]["name"], running_status(pod, ip))


def test_a_one_node_gang_gets_its_own_claim_and_a_restart_resumes_from_it(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class, rank0_metrics
) -> None:
    kube.apply(ftj_manifest("solo", namespace, resources=ONE_NODE))
    claim = wait_until(
        lambda: get(kube, namespace, "PersistentVolumeClaim", "solo-checkpoints"),
        timeout=30,
        message="checkpoint claim",
    )
    ftj = get(kube, namespace, "FineTuneJob", "solo")
    assert claim["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "30Gi"
    # The API server filled in the default class: the operator named none.
    assert claim["spec"]["storageClassName"] == default_storage_class
    first = wait_pods(kube, wait_until, namespace, "solo", 1, 1)
    volume = next(v for v in first[0]["spec"]["volumes"] if v["name"] == "checkpoints")
    assert volume["persistentVolumeClaim"]["claimName"] == "solo-checkpoints"
    status = ftj_status(kube, namespace, "solo")
    assert status["checkpoints"]["store"] == "Volume"
    assert condition(status, "CheckpointsDurable")["reason"] == "CheckpointVolume"

    # Attempt 1 trains from scratch to step 37, then its pod dies.
    rank0_metrics.set(step=37, total=100, resumed=0)
    run_pods(kube, namespace, first, rank0_metrics.ip)
    wait_until(
        lambda: ftj_status(kube, namespace, "solo").get("progress", {}).get("step") == 37,
        timeout=60,
        message="attempt 1 progress",
    )
    finish_pods(kube, namespace, first, 137)
    second = wait_pods(kube, wait_until, namespace, "solo", 2, 1)
    # Attempt 2 mounts the same claim and resumes from its last checkpoint, step 30.
    volume = next(v for v in second[0]["spec"]["volumes"] if v["name"] == "checkpoints")
    assert volume["persistentVolumeClaim"]["claimName"] == "solo-checkpoints"
    rank0_metrics.set(step=31, total=100, resumed=30)
    run_pods(kube, namespace, second, rank0_metrics.ip)
    status = wait_until(
        lambda: (
            (s := ftj_status(kube, namespace, "solo")).get("checkpoints", {}).get("attempt") == 2
            and s
        ),
        timeout=60,
        message="attempt 2 reports its resume step",
    )
    assert status["checkpoints"]["resumedFromStep"] == 30
    assert status["checkpoints"]["stepsLost"] == 7

    # The operator observes the restart's seconds once its status write returned, a moment
    # after the status can be read: wait for it rather than race it.
    def counts() -> list[str]:
        lines = operator.metrics().splitlines()
        return [
            line for line in lines if line.startswith("finetune_operator_restart_seconds_count")
        ]

    try:
        wait_until(
            lambda: counts() == ["finetune_operator_restart_seconds_count 1.0"],
            message="the restart's seconds in the operator's metrics",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {counts()}") from None


def test_a_claim_that_is_not_the_jobs_own_is_left_alone(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    mine = kube.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "taken-checkpoints", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )
    kube.apply(ftj_manifest("taken", namespace, resources=ONE_NODE))
    status = wait_until(
        lambda: (s := ftj_status(kube, namespace, "taken")).get("phase") == "Failed" and s,
        timeout=60,
        message="taken fails",
    )
    failed = condition(status, "Failed")
    assert failed["reason"] == "NameConflict"
    assert "taken-checkpoints" in failed["message"]
    assert get(kube, namespace, "Job", "taken") is None
    after = get(kube, namespace, "PersistentVolumeClaim", "taken-checkpoints")
    assert after["metadata"]["resourceVersion"] == mine["metadata"]["resourceVersion"]
    assert "ownerReferences" not in after["metadata"]


def test_a_gang_with_nowhere_durable_says_so_with_a_warning(
    operator: Operator, kube: Kube, namespace, wait_until
) -> None:
    kube.apply(ftj_manifest("adrift", namespace))  # two nodes, no hub, no claim
    status = wait_until(
        lambda: (
            (s := ftj_status(kube, namespace, "adrift"))
            and condition(s, "CheckpointsDurable").get("status") == "False"
            and s
        ),
        timeout=30,
        message="CheckpointsDurable=False",
    )
    assert condition(status, "CheckpointsDurable")["reason"] == "NoDurableStore"
    assert status["checkpoints"]["store"] == "Ephemeral"
    # Events are posted after the status write that caused them: wait for it.
    warnings = wait_until(
        lambda: [
            e
            for e in kube.list("Event", namespace, fields="involvedObject.name=adrift")
            if e["reason"] == "NoDurableStore"
        ],
        timeout=30,
        message="the NoDurableStore Event",
    )
    assert [e["type"] for e in warnings] == ["Warning"]
    assert get(kube, namespace, "Job", "adrift") is not None
