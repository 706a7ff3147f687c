"""Proves the control-plane harness: real API validation, Job controller and GC.

There is no kubelet: pods stay Pending and unbound. Tests act as the kubelet by
patching ``pods/status`` (phase + a terminated container status).
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from fixtures.cluster import patch_pod_status, terminated_status
from fixtures.kube import ApiError, Kube, refusal

WaitUntil = Callable[..., Any]

CRD_GROUP = "harness.finetune.test"
CRD_NAME = f"widgets.{CRD_GROUP}"

CRD = textwrap.dedent(
    f"""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: {CRD_NAME}
    spec:
      group: {CRD_GROUP}
      scope: Namespaced
      names:
        kind: Widget
        listKind: WidgetList
        plural: widgets
        singular: widget
      versions:
        - name: v1
          served: true
          storage: true
          subresources:
            status: {{}}
          schema:
            openAPIV3Schema:
              type: object
              properties:
                spec:
                  type: object
                  x-kubernetes-validations:
                    - rule: "self.minReplicas <= self.maxReplicas"
                      message: "minReplicas must not exceed maxReplicas"
                  properties:
                    minReplicas:
                      type: integer
                    maxReplicas:
                      type: integer
    """
)


def widget(name: str, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{CRD_GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
    }


def job_manifest(name: str, *, indexed: bool, completions: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": completions,
        "backoffLimit": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {"name": "main", "image": "example.invalid/x:1", "imagePullPolicy": "Never"}
                ],
            }
        },
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def job_pods(kube: Kube, namespace: str, job: str) -> list[dict[str, Any]]:
    pods = kube.list("Pod", namespace, labels=f"batch.kubernetes.io/job-name={job}")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def job_condition(job: dict[str, Any], ctype: str) -> bool:
    conditions = job.get("status", {}).get("conditions", [])
    return any(c["type"] == ctype and c["status"] == "True" for c in conditions)


def mark_pod_succeeded(kube: Kube, namespace: str, pod: dict[str, Any]) -> None:
    """Do what a kubelet would: report the pod's containers terminated with exit code 0."""
    patch_pod_status(kube, namespace, pod["metadata"]["name"], terminated_status(pod, exit_code=0))


@pytest.fixture
def widget_crd(kube: Kube, wait_until: WaitUntil) -> Iterator[str]:
    Kube.register("Widget", f"{CRD_GROUP}/v1", "widgets")
    kube.apply(yaml.safe_load(CRD))
    kube.wait_condition("CustomResourceDefinition", CRD_NAME, "Established", timeout=60)
    yield CRD_NAME
    # Wait, so that a later run against the same cluster does not meet a terminating CRD.
    kube.delete("CustomResourceDefinition", CRD_NAME, missing_ok=True)
    # As kubectl delete --timeout=60s: a slow finaliser is the next run's wait, not a failure.
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: kube.get("CustomResourceDefinition", CRD_NAME) is None,
            timeout=60,
            message=f"CRD {CRD_NAME} deleted",
        )


def accepted(kube: Kube, obj: dict[str, Any], namespace: str) -> bool:
    try:
        kube.apply(obj, namespace)
    except ApiError:
        return False
    return True


def test_crd_cel_validation_rejects_invalid_object(
    kube: Kube, namespace: str, widget_crd: str, wait_until: WaitUntil
) -> None:
    # Established does not mean the API server serves the kind on every path yet: retry the
    # valid create until it succeeds.
    wait_until(
        lambda: accepted(kube, widget("ok", 1, 3), namespace),
        timeout=30,
        message="valid Widget accepted",
    )

    bad = refusal(lambda: kube.apply(widget("bad", 5, 2), namespace), "Widget bad (5 > 2)")
    assert bad.status == 422, bad
    assert "minReplicas must not exceed maxReplicas" in bad.message, bad.message
    assert "Invalid value" in bad.message or "invalid" in bad.message.lower(), bad.message

    got = [w["metadata"]["name"] for w in kube.list("Widget", namespace)]
    assert got == ["ok"]


def test_indexed_job_pods_and_completion(kube: Kube, namespace: str, wait_until: WaitUntil) -> None:
    name = "harness-indexed"
    kube.apply(job_manifest(name, indexed=True, completions=2), namespace)

    pods = wait_until(
        lambda: (p := job_pods(kube, namespace, name)) and len(p) == 2 and p,
        timeout=60,
        message="2 pods created by the Job controller",
    )
    indexes = sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"]
    for p in pods:
        assert p["status"]["phase"] == "Pending"
        assert p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] in indexes
        owner = p["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("Job", name, True)

    for p in pods:
        mark_pod_succeeded(kube, namespace, p)

    job = wait_until(
        lambda: (j := kube.get("Job", name, namespace)) and job_condition(j, "Complete") and j,
        timeout=60,
        message="Job condition Complete",
    )
    assert job["status"]["succeeded"] == 2
    assert job["status"]["completedIndexes"] == "0,1"


def test_job_delete_garbage_collects_pods(
    kube: Kube, namespace: str, wait_until: WaitUntil
) -> None:
    name = "harness-gc"
    kube.apply(job_manifest(name, indexed=False, completions=2), namespace)
    wait_until(
        lambda: len(job_pods(kube, namespace, name)) == 2,
        timeout=60,
        message="2 pods created by the Job controller",
    )

    kube.delete("Job", name, namespace, propagation="Background")

    def pods_gone() -> bool:
        selector = f"batch.kubernetes.io/job-name={name}"
        return not kube.list("Pod", namespace, labels=selector)

    wait_until(pods_gone, timeout=60, message="garbage collector deleting the Job's pods")
    assert kube.get("Job", name, namespace) is None  # None only on 404 NotFound
