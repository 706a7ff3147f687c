"""spec.serve against a real API server, Deployment controller and garbage collector.

The CEL rules refuse a serve block without a push target and an unknown engine, as the Python
rules do. A job that Succeeded (its pods played as in test_operator.py) gets its serving
Deployment and Service for the pushed revision, owned by it; with no kubelet the rollout never
completes, so status.serve says RollingOut and names no revision. A changed spec.serve is applied
(serve is mutable); removing it deletes what it served; deleting the job deletes it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from fixtures.cluster import ftj_manifest, ftj_status, full_quota, room_in_quota, succeed
from fixtures.kube import Kube, refusal

from finetune_api.validation import ManifestError, parse_manifest
from finetune_operator import render, serve
from finetune_operator.apply import covers
from finetune_operator.settings import Settings

if TYPE_CHECKING:
    from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]
Kube.register("Deployment", "apps/v1", "deployments")

WaitUntil = Callable[..., Any]
OPEN_HUB = {"repo": "org/served", "endpoint": "http://hub.example:8080"}
REVISION = "89abcdef0123456789abcdef0123456789abcdef"
RESULT = {
    "status": "Succeeded",
    "reason": "PushedToHub",
    "message": "pushed",
    "evaluation": {"perplexity": {"before": 30.0, "after": 12.0}},
    "repo": OPEN_HUB["repo"],
    "revision": REVISION,
    "artifact": "adapter",
    "steps": 10,
}


@pytest.mark.parametrize(
    ("serve", "output", "field", "fragment"),
    [
        ({"engine": "transformers"}, None, "spec.serve", "push target"),
        ({"engine": "triton"}, {"hub": OPEN_HUB}, "spec.serve.engine", "vllm"),
        ({"replicas": 0}, {"hub": OPEN_HUB}, "spec.serve.replicas", ""),
    ],
    ids=["no-push-target", "unknown-engine", "no-replicas"],
)
def test_bad_serve_is_refused_by_api_server_and_python(
    crd: str,
    kube: Kube,
    namespace: str,
    serve: dict[str, Any],
    output: dict[str, Any] | None,
    field: str,
    fragment: str,
) -> None:
    doc = ftj_manifest("bad-serve", namespace, serve=serve)
    if output is not None:
        doc["spec"]["output"] = output
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc)
    assert field in str(info.value) and fragment in str(info.value), info.value
    refused = refusal(lambda: kube.create(doc), json.dumps(doc))
    assert refused.status == 422, refused
    assert field in refused.message and fragment in refused.message, refused.message


def test_a_succeeded_job_serves_its_pushed_revision_until_serve_or_the_job_goes(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    name, ns = "srv", namespace
    kube.apply(ftj_manifest(name, ns, output={"hub": OPEN_HUB}, serve={"engine": "transformers"}))
    waiting = wait_until(
        lambda: ftj_status(kube, ns, name).get("serve"), timeout=60, message="status.serve"
    )
    assert waiting["reason"] == "Waiting" and waiting["ready"] is False
    assert kube.get("Deployment", f"{name}-serve", ns) is None  # nothing before Succeeded

    succeed(kube, wait_until, ns, name, RESULT)
    deployment = wait_until(
        lambda: kube.get("Deployment", f"{name}-serve", ns), timeout=60, message="Deployment"
    )
    service = kube.get("Service", f"{name}-serve", ns)
    uid = kube.get("FineTuneJob", name, ns)["metadata"]["uid"]  # type: ignore[index]
    for obj in (deployment, service):
        assert obj is not None
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["uid"], ref["controller"]) == (uid, True)
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["finetune.dev/revision"] == REVISION
    # What the operator renders is what the API server keeps (plus defaults): a resync of a
    # served job only reads its Deployment and Service.
    job = parse_manifest(kube.get("FineTuneJob", name, ns))
    owner = render.owner_reference(name, uid)
    settings = Settings(trainer_image="ghcr.io/finetune-operator/trainer:test")
    rendered = serve.render_serve_deployment(job, owner, settings, REVISION, "adapter")
    assert covers(deployment, rendered)
    assert covers(service, serve.render_serve_service(job, owner))
    prepare = template["spec"]["initContainers"][0]["command"]
    assert prepare[prepare.index("--revision") + 1] == REVISION
    # No kubelet: the pods never get Ready, so the revision is not promoted.
    served = wait_until(
        lambda: (
            (s := ftj_status(kube, ns, name).get("serve", {})).get("reason") == "RollingOut" and s
        ),
        timeout=60,
        message="status.serve RollingOut",
    )
    assert served["ready"] is False and "revision" not in served
    assert served["url"] == f"http://{name}-serve.{ns}.svc:8000/v1"
    assert served["model"] == OPEN_HUB["repo"]
    assert ftj_status(kube, ns, name)["phase"] == "Succeeded"  # serving never fails the job

    # serve is mutable: a change is applied to the Deployment (a rollout).
    kube.patch("FineTuneJob", name, ns, {"spec": {"serve": {"replicas": 2}}})
    wait_until(
        lambda: (
            (kube.get("Deployment", f"{name}-serve", ns) or {}).get("spec", {}).get("replicas") == 2
        ),
        timeout=60,
        message="Deployment scaled to serve.replicas",
    )

    # Without spec.serve, what it served goes, and so does status.serve.
    kube.patch("FineTuneJob", name, ns, {"spec": {"serve": None}})
    wait_until(
        lambda: (
            kube.get("Deployment", f"{name}-serve", ns) is None
            and kube.get("Service", f"{name}-serve", ns) is None
            and "serve" not in ftj_status(kube, ns, name)
        ),
        timeout=60,
        message="the serving Deployment, Service and status.serve removed",
    )

    # Serve again, then delete the job: the garbage collector takes the Deployment with it.
    kube.patch("FineTuneJob", name, ns, {"spec": {"serve": {"engine": "transformers"}}})
    wait_until(
        lambda: kube.get("Deployment", f"{name}-serve", ns), timeout=60, message="served again"
    )
    kube.delete("FineTuneJob", name, ns)
    wait_until(
        lambda: (
            kube.get("Deployment", f"{name}-serve", ns) is None
            and kube.get("Service", f"{name}-serve", ns) is None
        ),
        timeout=90,
        message="the serving Deployment garbage-collected with the FineTuneJob",
    )


def test_a_serving_deployment_a_quota_refuses_is_made_once_the_quota_has_room(
    operator: Operator, kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    """The namespace's ResourceQuota (real admission and quota controller) allows no
    Deployment: status.serve says so, with a Warning, and the job stays Succeeded; the operator
    looks again by itself (a finished job has no other periodic pass than the resync) and
    makes it once the quota has room."""
    name, ns = "quota-srv", namespace
    quota = full_quota(kube, wait_until, ns, "count/deployments.apps")
    kube.apply(ftj_manifest(name, ns, output={"hub": OPEN_HUB}, serve={"engine": "transformers"}))
    succeed(kube, wait_until, ns, name, RESULT)
    served = wait_until(
        lambda: (
            (s := ftj_status(kube, ns, name).get("serve", {})).get("reason") == "QuotaExceeded"
            and s
        ),
        timeout=60,
        message="status.serve QuotaExceeded",
    )
    assert served["ready"] is False and "exceeded quota: deployments" in served["message"]
    assert ftj_status(kube, ns, name)["phase"] == "Succeeded"
    uid = kube.get("FineTuneJob", name, ns)["metadata"]["uid"]  # type: ignore[index]
    wait_until(
        lambda: any(
            (e["type"], e["reason"]) == ("Warning", "QuotaExceeded")
            for e in kube.list("Event", ns, fields=f"involvedObject.uid={uid}")
        ),
        timeout=15,
        message="the serve QuotaExceeded Warning",
    )
    room_in_quota(kube, ns, quota, "count/deployments.apps")
    wait_until(
        lambda: kube.get("Deployment", f"{name}-serve", ns), timeout=40, message="Deployment"
    )
