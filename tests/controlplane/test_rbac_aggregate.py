"""The chart's user-facing ClusterRoles on a real API server and kube-controller-manager.

`helm template` renders templates/rbac-aggregate.yaml; the ClusterRoles are created, and the
clusterrole-aggregation controller (in kube-controller-manager) folds them into the built-in
`admin`, `edit` and `view`. A user bound to `edit` in a namespace (a RoleBinding, as a platform
team grants it) may then create FineTuneJobs there and one bound to `view` may not:
`kubectl auth can-i --as=USER`, as the chart's README tells to check, and a real create and
`kubectl wait` as that user.

    flock /tmp/controlplane.lock python -m pytest tests/controlplane/test_rbac_aggregate.py
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.cluster import ftj_manifest
from fixtures.kube import Kube

pytest_plugins = ["fixtures.operator"]  # the `crd` fixture: the generated CRD, Established

# The session's `kubectl` fixture (conftest.Kubectl): kubectl(*args, input=, check=, timeout=).
Kubectl = Callable[..., subprocess.CompletedProcess[str]]
REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "finetune-operator"
RESOURCE = "finetunejobs.finetune.dev"
EDITOR, VIEWER, NOBODY = "alice@example.com", "bob@example.com", "eve@example.com"
for _kind, _plural, _scoped in (
    ("ClusterRole", "clusterroles", False),
    ("RoleBinding", "rolebindings", True),
):
    Kube.register(_kind, "rbac.authorization.k8s.io/v1", _plural, namespaced=_scoped)


def aggregate_roles(release: str, tmp: Path) -> list[dict[str, Any]]:
    """The ClusterRoles templates/rbac-aggregate.yaml renders for `release`."""
    helm = subprocess.run(
        [str(REPO_ROOT / "hack" / "helm.sh")], capture_output=True, text=True, timeout=1800
    )
    assert helm.returncode == 0, f"hack/helm.sh failed:\n{helm.stderr[-3000:]}"
    home = {v: str(tmp / v.lower()) for v in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME")}
    proc = subprocess.run(
        [helm.stdout.strip().splitlines()[-1], "template", release, str(CHART),
         "--show-only", "templates/rbac-aggregate.yaml"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **home, "KUBECONFIG": str(tmp / "none")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    roles = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert sorted(r["metadata"]["name"] for r in roles) == [
        f"{release}-finetune-operator-{suffix}" for suffix in ("admin", "edit", "view")
    ]
    return roles


def can_i(kubectl: Kubectl, user: str, verb: str, namespace: str, subresource: str = "") -> bool:
    """`kubectl auth can-i VERB finetunejobs.finetune.dev` as `user` (impersonated by the
    admin): exit 0 yes, 1 no."""
    args = ["auth", "can-i", verb, RESOURCE, "-n", namespace, f"--as={user}"]
    if subresource:
        args.append(f"--subresource={subresource}")
    proc = kubectl(*args, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


@pytest.fixture(scope="module")
def bound_namespace(
    kube: Kube, crd: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A namespace where EDITOR holds the built-in `edit` and VIEWER `view`, with the chart's
    aggregate roles created."""
    release = f"agg-{secrets.token_hex(3)}"
    roles = aggregate_roles(release, tmp_path_factory.mktemp("helm"))
    namespace = kube.create_namespace("ftj-rbac-agg")
    try:
        for role in roles:
            kube.create(role)
        for user, cluster_role in ((EDITOR, "edit"), (VIEWER, "view")):
            binding = {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{cluster_role}-{user.split('@')[0]}"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": cluster_role,
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                ],
            }
            kube.create(binding, namespace)
        yield namespace
    finally:
        kube.delete("Namespace", namespace, missing_ok=True)
        for role in roles:
            kube.delete("ClusterRole", role["metadata"]["name"], missing_ok=True)


def test_edit_may_create_finetunejobs_and_view_may_not(
    bound_namespace: str, kubectl: Kubectl, kube: Kube, wait_until: Callable[..., Any]
) -> None:
    namespace = bound_namespace
    # The aggregation controller folds the new roles into the built-in ones asynchronously.
    wait_until(
        lambda: can_i(kubectl, EDITOR, "create", namespace),
        timeout=60,
        message="the built-in edit role to aggregate the chart's finetune-operator-edit",
    )
    edit_rules = kube.get("ClusterRole", "edit")["rules"]  # type: ignore[index]
    assert any("finetunejobs" in r.get("resources", []) for r in edit_rules)
    for verb in ("get", "list", "watch", "update", "patch", "delete", "deletecollection"):
        assert can_i(kubectl, EDITOR, verb, namespace), verb
    wait_until(
        lambda: can_i(kubectl, VIEWER, "watch", namespace),
        timeout=60,
        message="the built-in view role to aggregate the chart's finetune-operator-view",
    )
    assert can_i(kubectl, VIEWER, "get", namespace)
    assert can_i(kubectl, VIEWER, "get", namespace, subresource="status")
    for verb in ("create", "update", "patch", "delete", "deletecollection"):
        assert not can_i(kubectl, VIEWER, verb, namespace), verb
    # Status is the operator's: not even an editor writes it.
    assert not can_i(kubectl, EDITOR, "patch", namespace, subresource="status")
    # A RoleBinding grants in its own namespace only, and an unbound user gets nothing.
    assert not can_i(kubectl, EDITOR, "create", "default")
    assert not can_i(kubectl, NOBODY, "get", namespace)


def test_an_editor_creates_a_finetunejob_and_waits_for_it(
    bound_namespace: str, kubectl: Kubectl, kube: Kube, wait_until: Callable[..., Any]
) -> None:
    """What the README says a user does: create a FineTuneJob, then
    `kubectl wait --for=condition=Succeeded ftj/NAME`. No operator runs here, so the test writes
    the Succeeded condition and observedGeneration as the operator does (status.py), through the
    status subresource."""
    namespace = bound_namespace
    wait_until(lambda: can_i(kubectl, EDITOR, "create", namespace), timeout=60, message="edit")
    manifest = json.dumps(ftj_manifest("mine", namespace))
    kubectl("create", "-f", "-", f"--as={EDITOR}", input=manifest)
    refused = kubectl("create", "-f", "-", f"--as={VIEWER}", input=manifest, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr

    def wait(timeout: str) -> subprocess.CompletedProcess[str]:
        return kubectl(
            "wait", "--for=condition=Succeeded", "ftj/mine", "-n", namespace,
            f"--timeout={timeout}", f"--as={EDITOR}", check=False, timeout=90,
        )  # fmt: skip

    assert wait("2s").returncode != 0  # not Succeeded yet: kubectl wait times out
    condition = {
        "type": "Succeeded",
        "status": "True",
        "reason": "PushedToHub",
        "message": "pushed",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    status = {"phase": "Succeeded", "conditions": [condition]}
    kube.patch("FineTuneJob", "mine", namespace, {"status": status}, subresource="status")
    # kubectl wait counts a condition only once status.observedGeneration (the schema's default
    # 0) has reached metadata.generation: a status about an older spec does not count.
    assert wait("2s").returncode != 0
    generation = kube.get("FineTuneJob", "mine", namespace)["metadata"]["generation"]  # type: ignore[index]
    observed = {"status": {"observedGeneration": generation}}
    kube.patch("FineTuneJob", "mine", namespace, observed, subresource="status")
    done = wait("60s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "condition met" in done.stdout
