"""The kind cluster has a default StorageClass that provisions volumes, as kind's own clusters do.

    pytest -m kind tests/kind/test_storage.py     # fixtures: tests/kind/conftest.py

hack/kind/build-storage-images.sh builds rancher's local-path-provisioner and its helper image;
`kind create` (or `cluster.sh up`, for an older cluster) installs kind's manifest: class
`standard`, the default, WaitForFirstConsumer, reclaimPolicy Delete. Here a claim that names no
class gets that one, stays Pending until a pod uses it, then binds; a file written by one pod is
read back by the next pod on the same claim; deleting the claim deletes the volume and, on our
own cluster, its directory on the node.

The pods run the provisioner's helper image (sh, on every node already), read from its
ConfigMap; FINETUNE_E2E_STORAGE_POD_IMAGE names another image with sh.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import yaml
from kind_tools import DOCKER, run

pytestmark = [pytest.mark.kind]

PROVISIONER = "rancher.io/local-path"
PROVISIONER_NAMESPACE = "local-path-storage"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
WAIT_S = 180
CLAIM = "data"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    """probe() until it returns something other than None; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1)


def default_classes(kube: Any) -> list[dict[str, Any]]:
    return [
        sc
        for sc in kube.json("get", "storageclass")["items"]
        if (sc["metadata"].get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
    ]


def pod_image(kube: Any) -> str:
    override = os.environ.get("FINETUNE_E2E_STORAGE_POD_IMAGE")
    if override:
        return override
    config = kube.json("-n", PROVISIONER_NAMESPACE, "get", "configmap", "local-path-config")
    helper = yaml.safe_load(config["data"]["helperPod.yaml"])
    return helper["spec"]["containers"][0]["image"]


def claim_pod(name: str, image: str, script: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["/bin/sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}}],
        },
    }


def run_to_completion(kube: Any, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    """Create the pod, wait until it ends, assert it succeeded; returns the pod."""
    name = pod["metadata"]["name"]
    kube.apply(pod, namespace)

    def ended() -> dict[str, Any] | None:
        got = kube.json("-n", namespace, "get", "pod", name)
        return got if got["status"].get("phase") in ("Succeeded", "Failed") else None

    done = wait_for(f"pod {name} to end", ended)
    logs = kube("-n", namespace, "logs", name, check=False)
    assert done["status"]["phase"] == "Succeeded", (done["status"], logs)
    return done


def volume_path(pv: dict[str, Any]) -> str:
    """The volume's directory on its node (hostPath or local, by the class's volumeType)."""
    spec = pv["spec"]
    source = spec.get("hostPath") or spec.get("local")
    assert source, f"PV {pv['metadata']['name']} has neither hostPath nor local: {spec}"
    return source["path"]


def test_standard_is_the_only_default_class(kube: Any) -> None:
    classes = default_classes(kube)
    assert [sc["metadata"]["name"] for sc in classes] == ["standard"], classes
    sc = classes[0]
    assert sc["provisioner"] == PROVISIONER
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["reclaimPolicy"] == "Delete"
    deployment = kube.json("-n", PROVISIONER_NAMESPACE, "get", "deployment/local-path-provisioner")
    assert deployment["status"].get("availableReplicas") == 1, deployment["status"]


def test_claim_on_default_class_binds_keeps_data_and_is_deleted(
    kube: Any, test_namespace: str, diagnostics: dict[str, str], timing: Any
) -> None:
    ns = test_namespace
    diagnostics["namespace"] = ns
    image = pod_image(kube)
    token = secrets.token_hex(8)

    # No storageClassName: the DefaultStorageClass admission fills in the default one.
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": CLAIM},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "64Mi"}},
            },
        },
        ns,
    )
    pvc = kube.json("-n", ns, "get", "pvc", CLAIM)
    assert pvc["spec"].get("storageClassName") == "standard", pvc["spec"]
    # WaitForFirstConsumer: nothing is provisioned while no pod uses the claim.
    assert pvc["status"].get("phase") == "Pending", pvc["status"]
    assert not pvc["spec"].get("volumeName"), pvc["spec"]

    t0 = time.monotonic()
    writer = run_to_completion(
        kube, ns, claim_pod("writer", image, f"echo {token} > /data/token && echo wrote")
    )
    timing.record("storage_provision_bind_write", time.monotonic() - t0)
    node = writer["spec"]["nodeName"]

    pvc = kube.json("-n", ns, "get", "pvc", CLAIM)
    assert pvc["status"]["phase"] == "Bound", pvc["status"]
    pv = kube.json("get", "pv", pvc["spec"]["volumeName"])
    pv_name = pv["metadata"]["name"]
    assert pv["spec"]["storageClassName"] == "standard"
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert pv["spec"]["claimRef"]["namespace"] == ns and pv["spec"]["claimRef"]["name"] == CLAIM
    # A local volume: pinned to the node the first consumer ran on.
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert [node] == [v for t in terms for e in t["matchExpressions"] for v in e["values"]], terms
    path = volume_path(pv)
    own_cluster = not os.environ.get("FINETUNE_KUBE_CONTEXT")
    if own_cluster:
        on_node = run([DOCKER, "exec", node, "cat", f"{path}/token"], timeout=60)
        assert on_node.strip() == token, f"{node}:{path}/token holds {on_node!r}"

    kube("-n", ns, "delete", "pod", "writer", "--wait=true", f"--timeout={WAIT_S}s")
    t0 = time.monotonic()
    reader = run_to_completion(
        kube, ns, claim_pod("reader", image, 'IFS= read -r got < /data/token && echo "read:$got"')
    )
    timing.record("storage_reattach_read", time.monotonic() - t0)
    assert reader["spec"]["nodeName"] == node
    assert f"read:{token}" in kube("-n", ns, "logs", "reader").splitlines()

    kube("-n", ns, "delete", "pod", "reader", "--wait=true", f"--timeout={WAIT_S}s")
    t0 = time.monotonic()
    kube("-n", ns, "delete", "pvc", CLAIM, "--wait=true", f"--timeout={WAIT_S}s")

    def pv_gone() -> bool | None:
        return True if not kube("get", "pv", pv_name, "--ignore-not-found", "-o", "name") else None

    wait_for(f"PV {pv_name} to be deleted (reclaimPolicy Delete)", pv_gone)
    timing.record("storage_reclaim_delete", time.monotonic() - t0)
    if own_cluster:
        # The provisioner's teardown helper removes the directory before the PV object goes.
        left = run([DOCKER, "exec", node, "ls", "-A", os.path.dirname(path)], timeout=60)
        assert os.path.basename(path) not in left.split(), f"{node}:{path} survived its PV"
