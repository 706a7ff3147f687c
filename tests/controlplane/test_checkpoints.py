"""Durable checkpoints on a real API server: the claim a one-node gang gets from the default
StorageClass, a restart that reports the step it resumed from and the steps it lost, a foreign
claim left alone, the Warning when nothing durable can be had, and the claim a failed job leaves
behind for one made again with its name (claimRetentionPolicy; the controller manager's garbage
collector and volume binder are real).

No kubelet runs here: the tests report pod status as a kubelet would, and a local HTTP server
plays rank 0's metrics endpoint (on the pod IP the tests report, `Rank0Metrics.ip`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fixtures.cluster import (
    bind_pod,
    create_node,
    delete_pod_now,
    ftj_manifest,
    patch_pod_status,
    running_status,
    storage_class,
    wait_condition,
    wait_phase,
)
from fixtures.kube import Kube
from prometheus_client.parser import text_string_to_metric_families
from test_operator import RESULT, condition, finish_pods, ftj_status, get, wait_pods

from finetune_api.result import TrainerResult
from finetune_operator.timings import unix

if TYPE_CHECKING:
    from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]

Kube.register("PersistentVolumeClaim", "v1", "persistentvolumeclaims")
Kube.register("StorageClass", "storage.k8s.io/v1", "storageclasses", namespaced=False)
Kube.register("PersistentVolume", "v1", "persistentvolumes", namespaced=False)
DEFAULT_CLASS = "finetune-test-default"
EXPANDABLE_CLASS = "finetune-test-expandable"
ONE_NODE = {"nodes": 1}
RETAINED_FROM = "finetune.dev/retained-from"
RETAINED_AT = "finetune.dev/retained-at"
FINALIZER = "finetune.dev/finalizer"
# What rank 0 reports when the Hub refuses its push: permanent, and its result is kept on the claim.
PUSH_REFUSED = TrainerResult(
    status="Failed", reason="PushFailed", message="403 Forbidden", retryable=False
)


@pytest.fixture
def default_storage_class(kube: Kube) -> Iterator[str]:
    """A StorageClass marked default, as kind's `standard` is (nothing provisions it here)."""
    kube.apply(storage_class(DEFAULT_CLASS, default=True, volumeBindingMode="WaitForFirstConsumer"))
    yield DEFAULT_CLASS
    kube.delete("StorageClass", DEFAULT_CLASS)


@pytest.fixture
def expandable_volume(kube: Kube, namespace: str) -> Iterator[str]:
    """A StorageClass that allows expansion, binding at once, and a volume of it waiting for the
    claim `kept-checkpoints` (nothing provisions or resizes volumes here: the claim's requested
    size is what expanding it asks for)."""
    expandable = {"allowVolumeExpansion": True, "volumeBindingMode": "Immediate"}
    kube.apply(storage_class(EXPANDABLE_CLASS, **expandable))
    volume = f"kept-{namespace}"
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": EXPANDABLE_CLASS,
                "persistentVolumeReclaimPolicy": "Retain",
                "claimRef": {"namespace": namespace, "name": "kept-checkpoints"},
                "hostPath": {"path": "/tmp/finetune-test-kept"},
            },
        }
    )
    yield EXPANDABLE_CLASS
    kube.delete("PersistentVolume", volume, missing_ok=True)
    kube.delete("StorageClass", EXPANDABLE_CLASS, missing_ok=True)


def events_of(kube: Kube, namespace: str, ftj: dict[str, Any]) -> list[dict[str, Any]]:
    """The Events of this very FineTuneJob (not of an earlier one with its name)."""
    name, uid = ftj["metadata"]["name"], ftj["metadata"]["uid"]
    events = kube.list("Event", namespace, fields=f"involvedObject.uid={uid}")
    return [e for e in events if e["involvedObject"]["name"] == name]


def owned_events(kube: Kube, namespace: str, ftj: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, reason) of each Event of this very FineTuneJob."""
    return [(e["type"], e["reason"]) for e in events_of(kube, namespace, ftj)]


def said(kube: Kube, namespace: str, ftj: dict[str, Any], reason: str) -> list[str]:
    """The messages of this very FineTuneJob's Events with `reason`."""
    return [e["message"] for e in events_of(kube, namespace, ftj) if e["reason"] == reason]


def kept_series(operator: Operator, namespace: str) -> dict[str, dict[str, Any]]:
    """The operator's retained-claim series in `namespace`, by claim: the job it was kept
    from, its bytes and when it was released."""
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            if sample.labels.get("namespace") != namespace:
                continue
            field = {
                "finetune_operator_retained_claim_bytes": "bytes",
                "finetune_operator_retained_claim_timestamp_seconds": "since",
            }.get(sample.name)
            if field:
                kept = out.setdefault(sample.labels["persistentvolumeclaim"], {})
                kept.update({"finetunejob": sample.labels["finetunejob"], field: sample.value})
    return out


def fail_and_delete(
    kube: Kube, namespace: str, wait_until: Any, name: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Fail the FineTuneJob's one pod as a refused push does, then delete the FineTuneJob and
    wait for the garbage collector to remove its Job: (the FineTuneJob, its last status, its
    claim once it is gone)."""
    ftj = get(kube, namespace, "FineTuneJob", name)
    assert ftj is not None
    pod = wait_pods(kube, wait_until, namespace, name, 1, 1)
    finish_pods(kube, namespace, pod, PUSH_REFUSED.exit_code, PUSH_REFUSED.to_message())
    status = wait_phase(kube, wait_until, namespace, name, "Failed")
    assert condition(status, "Failed")["reason"] == "PushFailed"
    kube.delete("FineTuneJob", name, namespace)
    wait_until(
        lambda: (
            get(kube, namespace, "FineTuneJob", name) is None
            and get(kube, namespace, "Job", name) is None
        ),
        timeout=60,
        message=f"{name} and its Job deleted",
    )
    return ftj, status, get(kube, namespace, "PersistentVolumeClaim", f"{name}-checkpoints")


def adopted_by(
    kube: Kube, namespace: str, wait_until: Any, name: str, claim: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The FineTuneJob made again as `name`, and `claim` once that one has adopted it: it
    controls the claim and has said so, its expansion asked for first (waiting for the old
    job's pods would not do: they may outlive their Job for a moment, on the same claim)."""

    def adopted() -> tuple[dict[str, Any], dict[str, Any]] | None:
        ftj = get(kube, namespace, "FineTuneJob", name) or {}
        uid = (ftj.get("metadata") or {}).get("uid")
        if not uid or not said(kube, namespace, ftj, "ClaimAdopted"):
            return None
        held = get(kube, namespace, "PersistentVolumeClaim", claim) or {}
        owners = (held.get("metadata") or {}).get("ownerReferences") or []
        return (ftj, held) if [o["uid"] for o in owners] == [uid] else None

    return wait_until(adopted, timeout=30, message=f"{claim} adopted by the new {name}")


def run_pods(kube: Kube, namespace: str, pods: list[dict[str, Any]], ip: str) -> None:
    for pod in pods:
        patch_pod_status(kube, namespace, pod["metadata"]["name"], running_status(pod, ip))


def test_a_claim_a_limit_range_refuses_fails_the_job_at_once_with_the_limit(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    """The namespace's LimitRange caps a claim at 10Gi (the API server's LimitRanger refuses the
    operator's 30Gi with a 403): no wait can cure that, so the job fails saying what to lower."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": {"name": "claims", "namespace": namespace},
            "spec": {"limits": [{"type": "PersistentVolumeClaim", "max": {"storage": "10Gi"}}]},
        }
    )
    kube.apply(ftj_manifest("capped", namespace, resources=ONE_NODE))
    status = wait_phase(kube, wait_until, namespace, "capped", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "ApplyRejected"
    assert failed["message"].startswith("PersistentVolumeClaim capped-checkpoints: ")
    assert "maximum storage usage per PersistentVolumeClaim is 10Gi" in failed["message"]
    assert failed["message"].endswith(
        "(spec.output.checkpoints.size and storageClassName make this claim)"
    )
    assert get(kube, namespace, "Job", "capped") is None


def test_a_stop_that_would_outlast_the_grace_period_is_a_warning(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class, rank0_metrics
) -> None:
    """Rank 0 says what a stop (SIGTERM) would take to end its step and save; the operator
    holds that against the pods' grace period (Kubernetes' 30 s here) in SavesOnStop, with a
    Warning Event (test_checkpoint_store has an estimate that fits, and a later pass that posts
    no second Event)."""
    kube.apply(ftj_manifest("stops", namespace, resources=ONE_NODE))
    pods = wait_pods(kube, wait_until, namespace, "stops", 1, 1)
    rank0_metrics.set(step=20, total=100, resumed=0, stop=41.2)
    run_pods(kube, namespace, pods, rank0_metrics.ip)
    status = wait_condition(
        kube, wait_until, namespace, "stops", "SavesOnStop", reason="GracePeriodTooShort"
    )
    slow = condition(status, "SavesOnStop")
    assert slow["status"] == "False"
    assert "about 42 s" in slow["message"] and "grace period of 30 s" in slow["message"]
    ftj = get(kube, namespace, "FineTuneJob", "stops")
    warned = wait_until(
        lambda: said(kube, namespace, ftj, "GracePeriodTooShort"),
        timeout=15,
        message="the GracePeriodTooShort Event",
    )
    assert warned == [slow["message"]]
    assert ("Warning", "GracePeriodTooShort") in owned_events(kube, namespace, ftj)


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
    status = wait_condition(
        kube, wait_until, namespace, "adrift", "CheckpointsDurable", status="False"
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


def test_a_failed_jobs_claim_outlives_it_and_one_made_again_adopts_and_expands_it(
    operator: Operator, kube: Kube, namespace, wait_until, expandable_volume
) -> None:
    checkpoints = {"storageClassName": expandable_volume, "size": "1Gi"}
    output = {"checkpoints": checkpoints}
    kube.apply(ftj_manifest("kept", namespace, resources=ONE_NODE, output=output))
    claim = wait_until(
        lambda: (
            (c := get(kube, namespace, "PersistentVolumeClaim", "kept-checkpoints"))
            and (c.get("status") or {}).get("phase") == "Bound"
            and c
        ),
        timeout=60,
        message="the claim bound to its volume",
    )
    first, status, kept = fail_and_delete(kube, namespace, wait_until, "kept")
    assert claim["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
    # Released when the job failed, before the status said so: its deletion left the claim.
    assert status["checkpoints"]["claimRetained"] is True
    assert kept is not None and kept["metadata"]["uid"] == claim["metadata"]["uid"]
    assert not kept["metadata"].get("ownerReferences")
    assert kept["metadata"]["labels"][RETAINED_FROM] == first["metadata"]["uid"]
    listed = kube.list("PersistentVolumeClaim", namespace, labels=RETAINED_FROM)
    assert [c["metadata"]["name"] for c in listed] == ["kept-checkpoints"]
    assert ("Normal", "ClaimRetained") in owned_events(kube, namespace, first)
    # The operator exports it until a job adopts it: 1Gi, released when the job failed.
    released = unix(kept["metadata"]["annotations"][RETAINED_AT])
    assert released is not None and abs(released - time.time()) < 120
    series = wait_until(
        lambda: kept_series(operator, namespace).get("kept-checkpoints"),
        timeout=15,
        message="the kept claim's series",
    )
    assert series == {"finetunejob": "kept", "bytes": 2.0**30, "since": released}

    # Made again with the same name and a larger size: it adopts the claim, expands it, and its
    # pod mounts it.
    checkpoints["size"] = "2Gi"
    kube.apply(ftj_manifest("kept", namespace, resources=ONE_NODE, output=output))
    second, adopted = adopted_by(kube, namespace, wait_until, "kept", "kept-checkpoints")
    again = wait_pods(kube, wait_until, namespace, "kept", 1, 1)
    volume = next(v for v in again[0]["spec"]["volumes"] if v["name"] == "checkpoints")
    assert volume["persistentVolumeClaim"]["claimName"] == "kept-checkpoints"
    assert adopted["metadata"]["uid"] == claim["metadata"]["uid"]
    assert [r["uid"] for r in adopted["metadata"]["ownerReferences"]] == [second["metadata"]["uid"]]
    assert adopted["metadata"]["ownerReferences"][0]["controller"] is True
    assert RETAINED_FROM not in adopted["metadata"]["labels"]
    assert adopted["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert ("Normal", "ClaimAdopted") in owned_events(kube, namespace, second)
    assert "claimRetained" not in ftj_status(kube, namespace, "kept").get("checkpoints", {})
    assert RETAINED_AT not in (adopted["metadata"].get("annotations") or {})
    wait_until(
        lambda: "kept-checkpoints" not in kept_series(operator, namespace),
        timeout=15,
        message="the adopted claim's series to go",
    )


def test_a_claim_another_storage_class_cannot_be_adopted_and_is_left_as_it_is(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    kube.apply(ftj_manifest("moved", namespace, resources=ONE_NODE))
    _, _, kept = fail_and_delete(kube, namespace, wait_until, "moved")
    assert kept is not None and kept["spec"]["storageClassName"] == default_storage_class
    output = {"checkpoints": {"storageClassName": "another"}}
    kube.apply(ftj_manifest("moved", namespace, resources=ONE_NODE, output=output))
    status = wait_phase(kube, wait_until, namespace, "moved", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "NameConflict"
    assert (
        f"is of StorageClass {default_storage_class}, not output.checkpoints" in (failed["message"])
    )
    after = get(kube, namespace, "PersistentVolumeClaim", "moved-checkpoints")
    assert after["metadata"]["resourceVersion"] == kept["metadata"]["resourceVersion"]
    assert get(kube, namespace, "Job", "moved") is None


def test_with_when_failed_delete_the_claim_goes_with_the_failed_job(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    policy = {"claimRetentionPolicy": {"whenFailed": "Delete"}}
    output = {"checkpoints": policy}
    kube.apply(ftj_manifest("gone", namespace, resources=ONE_NODE, output=output))
    _, status, _ = fail_and_delete(kube, namespace, wait_until, "gone")
    assert status["checkpoints"]["claimRetained"] is False
    wait_until(
        lambda: get(kube, namespace, "PersistentVolumeClaim", "gone-checkpoints") is None,
        timeout=60,
        message="the claim garbage-collected with its FineTuneJob",
    )


def test_a_kept_claim_its_class_cannot_expand_is_adopted_as_it_is(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    kube.apply(ftj_manifest("small", namespace, resources=ONE_NODE))
    _, _, kept = fail_and_delete(kube, namespace, wait_until, "small")
    assert kept is not None and kept["spec"]["resources"]["requests"]["storage"] == "30Gi"
    output = {"checkpoints": {"size": "40Gi"}}
    kube.apply(ftj_manifest("small", namespace, resources=ONE_NODE, output=output))
    again, adopted = adopted_by(kube, namespace, wait_until, "small", "small-checkpoints")
    uid = again["metadata"]["uid"]
    assert [r["uid"] for r in adopted["metadata"]["ownerReferences"]] == [uid]
    assert adopted["spec"]["resources"]["requests"]["storage"] == "30Gi"
    adopted_said = said(kube, namespace, again, "ClaimAdopted")
    # The default class has no allowVolumeExpansion (and the claim is not bound): the API
    # server's refusal is passed on, and the job goes on with the claim as it is.
    assert len(adopted_said) == 1
    assert "it stays 30Gi, as it cannot be expanded to output" in adopted_said[0]


def test_a_claim_of_a_storage_class_that_does_not_exist_waits_for_it_and_says_so(
    operator: Operator, kube: Kube, namespace, wait_until
) -> None:
    missing = f"finetune-test-{namespace}"
    output = {"checkpoints": {"storageClassName": missing}}
    kube.apply(ftj_manifest("classless", namespace, resources=ONE_NODE, output=output))
    status = wait_condition(
        kube, wait_until, namespace, "classless", "Created", reason="StorageClassNotFound"
    )
    created = condition(status, "Created")
    assert created["status"] == "False"
    assert created["message"].startswith(
        f"StorageClass {missing} (output.checkpoints.storageClassName) not found; the cluster has"
    )
    assert get(kube, namespace, "PersistentVolumeClaim", "classless-checkpoints") is None
    assert get(kube, namespace, "Job", "classless") is None
    ftj = get(kube, namespace, "FineTuneJob", "classless")
    wait_until(
        lambda: ("Warning", "StorageClassNotFound") in owned_events(kube, namespace, ftj),
        timeout=15,
        message="the StorageClassNotFound Event, which follows the status write",
    )
    # Made (as a platform team would), the class is found at the next check: the job goes on.
    kube.apply(storage_class(missing))
    try:
        wait_pods(kube, wait_until, namespace, "classless", 1, 1)
        claim = get(kube, namespace, "PersistentVolumeClaim", "classless-checkpoints")
        assert claim is not None and claim["spec"]["storageClassName"] == missing
    finally:
        kube.delete("StorageClass", missing, missing_ok=True)


def test_with_when_succeeded_retain_a_succeeded_jobs_claim_outlives_it_too(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    output = {"checkpoints": {"claimRetentionPolicy": {"whenSucceeded": "Retain"}}}
    kube.apply(ftj_manifest("done", namespace, resources=ONE_NODE, output=output))
    ftj = get(kube, namespace, "FineTuneJob", "done")
    pod = wait_pods(kube, wait_until, namespace, "done", 1, 1)
    # whenDeleted is Delete: nothing holds its deletion back, even while it runs.
    assert finalizers(kube, namespace, "done") == []
    finish_pods(kube, namespace, pod, 0, json.dumps(RESULT))
    status = wait_phase(kube, wait_until, namespace, "done", "Succeeded")
    assert status["checkpoints"]["claimRetained"] is True
    claim = get(kube, namespace, "PersistentVolumeClaim", "done-checkpoints")
    assert not claim["metadata"].get("ownerReferences")
    assert claim["metadata"]["labels"][RETAINED_FROM] == ftj["metadata"]["uid"]
    # The Event follows the status write that carries the transition, so it is waited for.
    retained = wait_until(
        lambda: said(kube, namespace, ftj, "ClaimRetained"),
        timeout=15,
        message="the ClaimRetained Event",
    )
    assert len(retained) == 1 and "claimRetentionPolicy.whenSucceeded: Retain" in retained[0]


def finalizers(kube: Kube, namespace: str, name: str) -> list[str]:
    return ((get(kube, namespace, "FineTuneJob", name) or {}).get("metadata") or {}).get(
        "finalizers"
    ) or []


def test_with_when_deleted_retain_a_gang_without_a_claim_of_the_operators_holds_nothing_back(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    """Two nodes cannot share the claim the operator makes: the policy has nothing to keep,
    so no finalizer makes the deletion wait for an operator."""
    output = {"checkpoints": {"claimRetentionPolicy": {"whenDeleted": "Retain"}}}
    kube.apply(ftj_manifest("pair", namespace, output=output))
    wait_pods(kube, wait_until, namespace, "pair", 1, 2)
    assert ftj_status(kube, namespace, "pair")["checkpoints"]["store"] == "Ephemeral"
    assert finalizers(kube, namespace, "pair") == []
    kube.delete("FineTuneJob", "pair", namespace)
    wait_until(
        lambda: get(kube, namespace, "FineTuneJob", "pair") is None,
        timeout=10,
        message="pair deleted at once",
    )


def test_with_when_deleted_retain_a_running_job_deleted_stops_its_gang_then_keeps_its_claim(
    operator: Operator, kube: Kube, namespace, wait_until, default_storage_class
) -> None:
    """Deleted while it runs (to fix output.hub.repo, say), the FineTuneJob stays until its
    gang has stopped, whose pods save a checkpoint at SIGTERM, and only then releases its claim
    and goes; the one made again adopts the claim. Once a job has ended it holds nothing back."""
    output = {"checkpoints": {"claimRetentionPolicy": {"whenDeleted": "Retain"}}}
    kube.apply(ftj_manifest("edit", namespace, resources=ONE_NODE, output=output))
    (pod,) = wait_pods(kube, wait_until, namespace, "edit", 1, 1)
    # On a node, so that its deletion waits for the kubelet (this test) to confirm it.
    node = f"node-{namespace}"
    create_node(kube, node)
    try:
        bind_pod(kube, namespace, pod["metadata"]["name"], node)
        run_pods(kube, namespace, [pod], "10.0.0.9")
        wait_until(
            lambda: FINALIZER in finalizers(kube, namespace, "edit"),
            timeout=30,
            message="the finalizer on a running job that keeps its claim",
        )
        ftj = get(kube, namespace, "FineTuneJob", "edit")
        kube.delete("FineTuneJob", "edit", namespace)
        # The gang is stopped (its Job deleted, foreground) while the FineTuneJob and its
        # ownership of the claim stay.
        wait_until(
            lambda: (
                (get(kube, namespace, "Pod", pod["metadata"]["name"]) or {})
                .get("metadata", {})
                .get("deletionTimestamp")
            ),
            timeout=30,
            message="the gang's pod told to stop",
        )
        held = get(kube, namespace, "FineTuneJob", "edit")
        assert held is not None and held["metadata"].get("deletionTimestamp")
        claim = get(kube, namespace, "PersistentVolumeClaim", "edit-checkpoints")
        assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == [ftj["metadata"]["uid"]]
        # The pod has saved and exited: the kubelet confirms its deletion.
        delete_pod_now(kube, namespace, pod["metadata"]["name"])
    finally:
        kube.delete("Node", node, missing_ok=True)
    wait_until(
        lambda: get(kube, namespace, "FineTuneJob", "edit") is None,
        timeout=60,
        message="the FineTuneJob gone once its claim is kept",
    )
    # Its other children went with it (not later, with the garbage collector).
    for kind, child in (("ConfigMap", "edit"), ("Service", "edit"), ("Service", "edit-rendezvous")):
        assert get(kube, namespace, kind, child) is None, (kind, child)
    kept = get(kube, namespace, "PersistentVolumeClaim", "edit-checkpoints")
    assert kept is not None and kept["metadata"]["uid"] == claim["metadata"]["uid"]
    assert not kept["metadata"].get("ownerReferences")
    assert kept["metadata"]["labels"][RETAINED_FROM] == ftj["metadata"]["uid"]
    assert RETAINED_AT in kept["metadata"]["annotations"]
    retained = said(kube, namespace, ftj, "ClaimRetained")
    assert len(retained) == 1 and "claimRetentionPolicy.whenDeleted: Retain" in retained[0]

    # Made again, it adopts the claim; once it has ended, its finalizer goes, and deleting it
    # waits for nothing (its claim went as whenSucceeded said: with it).
    kube.apply(ftj_manifest("edit", namespace, resources=ONE_NODE, output=output))
    adopted_by(kube, namespace, wait_until, "edit", "edit-checkpoints")
    (pod,) = wait_pods(kube, wait_until, namespace, "edit", 1, 1)
    finish_pods(kube, namespace, [pod], 0, json.dumps(RESULT))
    wait_phase(kube, wait_until, namespace, "edit", "Succeeded")
    wait_until(
        lambda: FINALIZER not in finalizers(kube, namespace, "edit"),
        timeout=30,
        message="the finalizer gone from the ended job",
    )
