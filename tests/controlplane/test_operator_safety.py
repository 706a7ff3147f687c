"""What the operator must never do, on a real API server: write over or delete an object it did
not create, post an Event per retry, retry past the whole job's deadline, or leave behind a
FineTuneJob that cannot be deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from fixtures.cluster import condition, ftj_manifest, ftj_status, wait_phase
from fixtures.kube import Kube

from finetune_api.validation import parse_manifest
from finetune_operator import render
from finetune_operator.apply import covers

if TYPE_CHECKING:
    from fixtures.operator import Operator

    from conftest import Kubectl

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
Obj = dict[str, Any]


def users_object(kind: str, name: str, namespace: str) -> Obj:
    """What someone else made before the FineTuneJob: no owner, its own content."""
    meta = {"name": name, "namespace": namespace, "labels": {"app": "mine"}}
    if kind == "ConfigMap":
        return {"apiVersion": "v1", "kind": kind, "metadata": meta, "data": {"mine": "yes"}}
    if kind == "Service":
        spec = {"selector": {"app": "mine"}, "ports": [{"name": "http", "port": 80}]}
        return {"apiVersion": "v1", "kind": kind, "metadata": meta, "spec": spec}
    container = {"name": "main", "image": "registry.example/mine:1", "command": ["true"]}
    pod = {"restartPolicy": "Never", "containers": [container]}
    spec = {"suspend": True, "template": {"spec": pod}}
    return {"apiVersion": "batch/v1", "kind": kind, "metadata": meta, "spec": spec}


def fingerprint(obj: Obj | None) -> tuple[Any, ...]:
    """What must not change: the object itself, its owners, labels and content."""
    assert obj is not None, "the user's object is gone"
    meta = obj["metadata"]
    content = obj.get("data") or (obj.get("spec") or {}).get("selector")
    managers = {m.get("manager") for m in meta.get("managedFields") or []}
    assert "finetune-operator" not in managers, managers
    return (
        meta["uid"],
        meta["resourceVersion"],
        meta.get("ownerReferences"),
        meta.get("labels"),
        content,
    )


def owned_sentinel(kube: Kube, namespace: str, name: str) -> str:
    """A ConfigMap owned by the FineTuneJob: once the garbage collector took it, it has acted
    on the FineTuneJob's deletion, so anything still standing was spared."""
    ftj = kube.get("FineTuneJob", name, namespace)
    assert ftj is not None
    owner = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": name,
        "uid": ftj["metadata"]["uid"],
    }
    sentinel = f"{name}-sentinel"
    meta = {"name": sentinel, "namespace": namespace, "ownerReferences": [owner]}
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})
    return sentinel


def events_of(kube: Kube, namespace: str, name: str) -> list[tuple[str, str]]:
    events = kube.list("Event", namespace, fields=f"involvedObject.name={name}")
    return [
        (e["type"], e["reason"]) for e in events if e["involvedObject"]["kind"] == "FineTuneJob"
    ]


@pytest.mark.parametrize("kind", ["ConfigMap", "Service", "Job"])
def test_an_object_it_did_not_create_is_never_taken_over(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil, kind: str
) -> None:
    name = f"taken-{kind.lower()}"
    kube.create(users_object(kind, name, namespace))
    if kind == "Job":  # the Job controller's own status write comes first
        kube.wait_condition("Job", name, "Suspended", namespace, timeout=30)
    before = fingerprint(kube.get(kind, name, namespace))
    kube.apply(ftj_manifest(name, namespace, runPolicy={"backoffLimit": 3}))

    status = wait_phase(kube, wait_until, namespace, name, "Failed", timeout=60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "NameConflict"
    assert f"{kind} {name} already exists" in failed["message"]
    assert "left untouched" in failed["message"]
    assert fingerprint(kube.get(kind, name, namespace)) == before
    if kind != "Job":
        assert kube.get("Job", name, namespace) is None  # no gang without its children
    wait_until(
        lambda: ("Warning", "NameConflict") in events_of(kube, namespace, name),
        timeout=30,
        message="a Warning Event NameConflict",
    )

    sentinel = owned_sentinel(kube, namespace, name)
    kube.delete("FineTuneJob", name, namespace)
    wait_until(
        lambda: kube.get("FineTuneJob", name, namespace) is None,
        timeout=60,
        message="FineTuneJob deleted",
    )
    wait_until(
        lambda: kube.get("ConfigMap", sentinel, namespace) is None,
        timeout=60,
        message="the garbage collector acting on the deletion",
    )
    assert fingerprint(kube.get(kind, name, namespace)) == before


def test_missing_secret_is_one_warning_event_however_many_passes(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    hub = {"repo": "org/x", "tokenSecretRef": {"name": "hf"}}
    kube.apply(ftj_manifest("nosecret", namespace, output={"hub": hub}))
    wait_until(
        lambda: (
            condition(ftj_status(kube, namespace, "nosecret"), "Created").get("reason")
            == "SecretNotFound"
        ),
        timeout=30,
        message="Created=False SecretNotFound",
    )
    # Each runPolicy change is a pass of its own; observedGeneration says it was made.
    for ttl in (100, 101, 102):
        patch = {"spec": {"runPolicy": {"ttlSecondsAfterFinished": ttl}}}
        generation = kube.patch("FineTuneJob", "nosecret", namespace, patch)["metadata"][
            "generation"
        ]
        wait_until(
            lambda g=generation: (
                ftj_status(kube, namespace, "nosecret").get("observedGeneration") == g
            ),
            timeout=30,
            message=f"a pass over generation {generation}",
        )

    # The Event is posted right after the status write that made the transition.
    def warnings() -> list[tuple[str, str]]:
        return [e for e in events_of(kube, namespace, "nosecret") if e[0] == "Warning"]

    wait_until(warnings, message="a Warning Event")
    assert warnings() == [("Warning", "SecretNotFound")]
    assert kube.get("Job", "nosecret", namespace) is None


def test_the_deadline_is_for_the_whole_job(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    policy = {"backoffLimit": 3, "activeDeadlineSeconds": 3}
    kube.apply(ftj_manifest("late", namespace, runPolicy=policy))
    job = wait_until(lambda: kube.get("Job", "late", namespace), timeout=30, message="Job")
    assert job["spec"]["activeDeadlineSeconds"] == 3
    # The Job controller ends the attempt at its deadline; no attempt may follow.
    status = wait_phase(kube, wait_until, namespace, "late", "Failed", timeout=60)
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    assert status["attempts"] == 1


def largest_spec_manifest(name: str, namespace: str) -> Obj:
    """A FineTuneJob at the bounds of its schema where the size is (env, volumeMounts,
    nodeSelector, targetModules, metrics and gates, sources), still valid for the Job."""
    prefix = ".".join(["a" * 63] * 3 + ["a" * 61])  # a 253-character DNS subdomain
    metrics = [f"metric{i:02d}" + "x" * 120 for i in range(16)]
    template = {
        "env": [{"name": f"E{i:02d}_" + "X" * 249, "value": "v" * 1024} for i in range(64)],
        "nodeSelector": {f"{prefix}/k{i:02d}" + "a" * 60: "v" * 63 for i in range(32)},
        "volumes": [{"name": f"v{i:02d}", "emptyDir": {}} for i in range(32)],
        "volumeMounts": [
            {
                "name": f"v{i:02d}",
                "mountPath": f"/m{i:02d}/" + "p" * 507,
                "subPath": "s" * 512,
                "readOnly": True,
            }
            for i in range(32)
        ],
    }
    return ftj_manifest(
        name,
        namespace,
        # The longest sources are paths: a Hub repo id is at most 96 + 1 + 96 characters.
        model={"source": "file:///" + "m" * 1016},
        dataset={"source": "file:///" + "d" * 1016},
        peft={"targetModules": [f"m{i:02d}" + "x" * 125 for i in range(64)]},
        evaluation={"metrics": metrics, "gates": dict.fromkeys(metrics, 0.5)},
        template=template,
    )


def test_the_largest_spec_is_created_reconciled_and_deleted(
    operator: Operator, kube: Kube, kubectl: Kubectl, namespace: str, wait_until: WaitUntil
) -> None:
    manifest = largest_spec_manifest("big", namespace)
    size = len(json.dumps(manifest["spec"], separators=(",", ":")))
    assert size > 128 * 1024, size
    # Client-side apply, as most users do: kubectl keeps its own copy in an annotation.
    kubectl("apply", "-f", "-", input=json.dumps(manifest))
    wait_until(lambda: kube.get("Job", "big", namespace), timeout=60, message="the Job")
    annotations = wait_until(
        lambda: (
            (a := kube.get("FineTuneJob", "big", namespace)["metadata"].get("annotations") or {})
            and "finetune.dev/last-handled-configuration" in a
            and a
        ),
        timeout=30,
        message="kopf's diff-base",
    )
    assert len(annotations["kubectl.kubernetes.io/last-applied-configuration"]) > size
    # kopf's own copy holds runPolicy only, however large the spec.
    diff_base = json.loads(annotations["finetune.dev/last-handled-configuration"])
    assert set(diff_base) == {"spec"} and set(diff_base["spec"]) == {"runPolicy"}

    kube.delete("FineTuneJob", "big", namespace)
    wait_until(
        lambda: kube.get("FineTuneJob", "big", namespace) is None,
        timeout=60,
        message="the FineTuneJob gone (finalizer removed)",
    )


def test_children_in_place_are_only_read(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    """What the operator renders is what the API server keeps (plus defaults), so a resync
    pass over children that are in place reads them and writes nothing."""
    kube.apply(ftj_manifest("steady", namespace))
    wait_until(lambda: kube.get("Job", "steady", namespace), timeout=30, message="the Job")
    job = parse_manifest(kube.get("FineTuneJob", "steady", namespace))
    owner = render.owner_reference("steady", job.metadata.uid or "")
    for manifest in (render.render_configmap(job, owner), render.render_service(job, owner)):
        assert covers(kube.get(manifest["kind"], "steady", namespace), manifest), manifest["kind"]


def test_an_event_that_happens_once_is_posted_once_however_many_passes(
    kubeconfig: str, kube: Kube, namespace: str
) -> None:
    """A pass repeated after a restart (a deletion that kept the claim, say) posts its `once`
    Event again: the API server refuses the second by its name, and the object has one."""
    import asyncio

    from kubernetes import client, config

    from finetune_operator.apply import Kube as OperatorKube

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    owner = kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}},
                        namespace)  # fmt: skip

    async def two_passes() -> None:
        operator_kube = OperatorKube(configuration)
        try:
            for _ in range(2):
                await operator_kube.post_event(
                    owner, "Normal", "ClaimRetained", "kept", once="claim-retained"
                )
                await operator_kube.post_event(owner, "Normal", "Progress", "each pass")
        finally:
            await operator_kube.close()

    asyncio.run(two_passes())
    uid = owner["metadata"]["uid"]
    events = kube.list("Event", namespace, fields=f"involvedObject.uid={uid}")
    assert sorted(e["reason"] for e in events) == ["ClaimRetained", "Progress", "Progress"]
