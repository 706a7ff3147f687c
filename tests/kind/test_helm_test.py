"""`helm test` of the release installed on kind: the chart's test Pod, of the operator image and
under a Role of its own, creates a suspended FineTuneJob, sees the operator reconcile it, and
deletes it (finetune_operator.selftest; its failure: tests/controlplane/test_operator_rbac.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from conftest import OPERATOR_NAMESPACE, RELEASE

pytestmark = [pytest.mark.kind]


def test_helm_test_passes_and_leaves_only_its_pod(
    kube: Any, operator_release: dict[str, str], release_helm: Callable[..., str]
) -> None:
    out = release_helm("test", RELEASE, "--logs", "--timeout", "3m")
    assert re.search(r"^Phase:\s+Succeeded$", out, re.MULTILINE), out
    assert re.search(r"reconciled in [\d.]+s: phase Suspended, observedGeneration 1", out), out
    assert f"PASSED: the operator reconciles FineTuneJobs in {OPERATOR_NAMESPACE}" in out, out
    name = f"{RELEASE}-test"
    # Its ServiceAccount and Role went once it passed; the Pod stays for --logs.
    for kind in ("role", "rolebinding", "serviceaccount"):
        found = kube("-n", OPERATOR_NAMESPACE, "get", kind, name, "--ignore-not-found")
        assert not found.strip(), f"{kind} {name} is left: {found}"
    pod = kube.json("-n", OPERATOR_NAMESPACE, "get", "pod", name)
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "helm-test"
    selector = "app.kubernetes.io/component=helm-test"
    left = kube.json("-n", OPERATOR_NAMESPACE, "get", "finetunejobs", "-l", selector)
    assert left["items"] == []
