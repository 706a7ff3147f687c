"""Proves the control-plane harness: real API validation, Job controller and GC.

There is no kubelet: pods stay Pending and unbound. Tests act as the kubelet by
patching ``pods/status`` (phase + a terminated container status).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from fixtures.cluster import terminated_status

if TYPE_CHECKING:  # conftest helpers reach the tests as fixtures, not imports
    from conftest import Kubectl

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


def job_pods(kubectl: Kubectl, namespace: str, job: str) -> list[dict[str, Any]]:
    pods = kubectl.json("-n", namespace, "get", "pods", "-l", f"batch.kubernetes.io/job-name={job}")
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]


def job_condition(job: dict[str, Any], ctype: str) -> bool:
    conditions = job.get("status", {}).get("conditions", [])
    return any(c["type"] == ctype and c["status"] == "True" for c in conditions)


def mark_pod_succeeded(kubectl: Kubectl, namespace: str, pod: dict[str, Any]) -> None:
    """Do what a kubelet would: report the pod's containers terminated with exit code 0."""
    status = terminated_status(pod, exit_code=0)
    kubectl(
        "-n",
        namespace,
        "patch",
        "pod",
        pod["metadata"]["name"],
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


@pytest.fixture
def widget_crd(kubectl: Kubectl):
    kubectl.apply(CRD)
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    yield CRD_NAME
    # Wait, so that a later run against the same cluster does not meet a terminating CRD.
    kubectl(
        "delete", "crd", CRD_NAME, "--ignore-not-found", "--timeout=60s", check=False, timeout=90
    )


def test_crd_cel_validation_rejects_invalid_object(
    kubectl: Kubectl, namespace: str, widget_crd: str, wait_until: WaitUntil
) -> None:
    # Established does not mean every client's discovery knows the kind yet: retry the
    # valid create until it succeeds.
    wait_until(
        lambda: kubectl.apply(widget("ok", 1, 3), "-n", namespace, check=False).returncode == 0,
        timeout=30,
        message="valid Widget accepted",
    )

    bad = kubectl.apply(widget("bad", 5, 2), "-n", namespace, check=False)
    assert bad.returncode != 0
    assert "minReplicas must not exceed maxReplicas" in bad.stderr, bad.stderr
    assert "Invalid value" in bad.stderr or "invalid" in bad.stderr.lower(), bad.stderr

    got = kubectl("-n", namespace, "get", "widgets", "-o", "name").stdout.split()
    assert got == [f"widget.{CRD_GROUP}/ok"]


def test_indexed_job_pods_and_completion(
    kubectl: Kubectl, namespace: str, wait_until: WaitUntil
) -> None:
    name = "harness-indexed"
    kubectl.apply(job_manifest(name, indexed=True, completions=2), "-n", namespace)

    pods = wait_until(
        lambda: (p := job_pods(kubectl, namespace, name)) and len(p) == 2 and p,
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
        mark_pod_succeeded(kubectl, namespace, p)

    job = wait_until(
        lambda: (
            (j := kubectl.json("-n", namespace, "get", "job", name))
            and job_condition(j, "Complete")
            and j
        ),
        timeout=60,
        message="Job condition Complete",
    )
    assert job["status"]["succeeded"] == 2
    assert job["status"]["completedIndexes"] == "0,1"


def test_job_delete_garbage_collects_pods(
    kubectl: Kubectl, namespace: str, wait_until: WaitUntil
) -> None:
    name = "harness-gc"
    kubectl.apply(job_manifest(name, indexed=False, completions=2), "-n", namespace)
    wait_until(
        lambda: len(job_pods(kubectl, namespace, name)) == 2,
        timeout=60,
        message="2 pods created by the Job controller",
    )

    kubectl("-n", namespace, "delete", "job", name, "--cascade=background", "--wait=false")

    def pods_gone() -> bool:
        selector = f"batch.kubernetes.io/job-name={name}"
        return not kubectl.json("-n", namespace, "get", "pods", "-l", selector)["items"]

    wait_until(pods_gone, timeout=60, message="garbage collector deleting the Job's pods")
    gone = kubectl("-n", namespace, "get", "job", name, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
