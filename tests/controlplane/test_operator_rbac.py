"""The operator under the chart's own RBAC with `rbac.getSecrets=false`: it may not read
Secrets, so it cannot check output.hub.tokenSecretRef, and must create the Job anyway (a
missing Secret then shows on the pod).

The operator runs as the chart's ServiceAccount, with a token from the TokenRequest API and the
Role/ClusterRole that `helm template` renders for one watched namespace, and holds its leader
election Lease there under the chart's Role for it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.cluster import (
    bind_pod,
    condition,
    create_node,
    ftj_manifest,
    ftj_status,
    patch_pod_status,
    running_status,
    set_node_ready,
    succeed,
    terminated_status,
    wait_condition,
)
from fixtures.kube import Kube
from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
for _kind, _scoped in (
    ("Role", True),
    ("RoleBinding", True),
    ("ClusterRole", False),
    ("ClusterRoleBinding", False),
):
    Kube.register(_kind, "rbac.authorization.k8s.io/v1", _kind.lower() + "s", namespaced=_scoped)


def render_chart(namespace: str, release: str, tmp: Path, *args: str) -> list[dict[str, Any]]:
    """`helm template` of the chart as release `release` in `namespace`, with `args`."""
    helm = subprocess.run(
        [str(REPO_ROOT / "hack" / "helm.sh")], capture_output=True, text=True, timeout=1800
    )
    assert helm.returncode == 0, f"hack/helm.sh failed:\n{helm.stderr[-3000:]}"
    home = {v: str(tmp / v.lower()) for v in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME")}
    chart = str(REPO_ROOT / "charts" / "finetune-operator")
    proc = subprocess.run(
        [helm.stdout.strip().splitlines()[-1], "template", release, chart, "-n", namespace, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **home, "KUBECONFIG": str(tmp / "none")},
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def chart_rbac(namespace: str, release: str, tmp: Path) -> list[dict[str, Any]]:
    """The ServiceAccount and RBAC the chart renders to watch `namespace`, without Secrets."""
    docs = render_chart(
        namespace,
        release,
        tmp,
        "--skip-tests",
        "--set",
        "rbac.getSecrets=false",
        "--set",
        f"watchNamespaces={{{namespace}}}",
    )
    docs = [d for d in docs if d["kind"] in RBAC_KINDS]
    rules = [r for d in docs if d["kind"] == "Role" for r in d["rules"]]
    assert rules and not any("secrets" in r["resources"] for r in rules)
    return docs


def service_account_kubeconfig(kube: Kube, admin: str, namespace: str, sa: str, out: Path) -> str:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token"
    token = kube.request("POST", path, request)["status"]["token"]
    config = yaml.safe_load(Path(admin).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])
    out.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa}}],
                "current-context": sa,
            }
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def restricted(
    kube: Kube, kubeconfig: str, crd: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An operator without Secret access, watching a namespace of its own; yields that name."""
    if os.pathsep in kubeconfig:
        pytest.skip("needs a single kubeconfig file to copy the cluster from")
    tmp = tmp_path_factory.mktemp("rbac")
    namespace = kube.create_namespace("ftj-rbac")
    release = f"op-{namespace.rsplit('-', 1)[-1]}"
    docs = chart_rbac(namespace, release, tmp)
    created: list[dict[str, Any]] = []
    operator = None
    try:
        for doc in docs:
            created.append(kube.create(doc, namespace))
        sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
        config = service_account_kubeconfig(kube, kubeconfig, namespace, sa, tmp / "kubeconfig")
        # With the chart's leader election (the Deployment's env): it must hold its Lease under
        # these rules before kopf starts.
        lease_rule = next(
            r
            for d in docs
            if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election")
            for r in d["rules"]
            if r.get("resourceNames")
        )
        env = {
            "FINETUNE_WATCH_NAMESPACES": namespace,
            "FINETUNE_LEADER_ELECTION": "true",
            "FINETUNE_LEADER_ELECTION_NAMESPACE": namespace,
            "FINETUNE_LEADER_ELECTION_LEASE": lease_rule["resourceNames"][0],
        }
        operator = Operator(config, tmp / "operator.log", extra_env=env)
        operator.start()
        assert f"holding lease {namespace}/{env['FINETUNE_LEADER_ELECTION_LEASE']}" in (
            operator.logs()
        )
        yield namespace
    finally:
        if operator is not None:
            operator.stop()
            if os.environ.get("FINETUNE_SHOW_OPERATOR_LOG"):
                print(operator.logs()[-20000:])
        for doc in created:
            if doc["kind"].startswith("Cluster"):
                kube.delete(doc["kind"], doc["metadata"]["name"], missing_ok=True)
        kube.delete("Namespace", namespace, missing_ok=True)


def test_without_secret_access_the_job_is_created_anyway(
    restricted: str, kube: Kube, wait_until: Callable[..., Any]
) -> None:
    namespace = restricted
    hub = {"repo": "org/x", "tokenSecretRef": {"name": "hf-token"}}
    kube.apply(ftj_manifest("blind", namespace, output={"hub": hub}))
    job = wait_until(lambda: kube.get("Job", "blind", namespace), timeout=60, message="the Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    status = wait_condition(kube, wait_until, namespace, "blind", "Created", status="True")
    assert condition(status, "Created")["reason"] == "WorkloadCreated"


def test_under_the_charts_role_pods_that_cannot_be_made_say_why(
    restricted: str, kube: Kube, wait_until: Callable[..., Any]
) -> None:
    """The chart lets the operator list Events: the only place a Job's FailedCreate shows."""
    namespace = restricted
    kube.apply(ftj_manifest("nosa", namespace, template={"serviceAccountName": "missing-sa"}))
    running = wait_until(
        lambda: (
            (c := condition(ftj_status(kube, namespace, "nosa"), "Running"))
            and c.get("reason") == "FailedCreate"
            and c
        ),
        timeout=30,
        message="Running=False FailedCreate",
    )
    assert 'serviceaccount "missing-sa" not found' in running["message"]


def test_under_the_charts_role_a_succeeded_job_is_served_and_unserved(
    restricted: str, kube: Kube, wait_until: Callable[..., Any]
) -> None:
    """spec.serve needs the chart to grant Deployments (and deleting Services): the operator
    makes the serving Deployment and Service, watches the Deployment, and deletes both when
    spec.serve is removed."""
    namespace, name = restricted, "served"
    Kube.register("Deployment", "apps/v1", "deployments")
    hub = {"repo": "org/served", "endpoint": "http://hub.example:8080"}
    kube.apply(ftj_manifest(name, namespace, output={"hub": hub}, serve={"engine": "vllm"}))
    result = {"status": "Succeeded", "reason": "PushedToHub", "repo": hub["repo"],
              "revision": "f" * 40, "artifact": "adapter", "steps": 1}  # fmt: skip
    succeed(kube, wait_until, namespace, name, result)
    wait_until(
        lambda: (
            kube.get("Deployment", f"{name}-serve", namespace)
            and kube.get("Service", f"{name}-serve", namespace)
            and ftj_status(kube, namespace, name).get("serve", {}).get("reason") == "RollingOut"
        ),
        timeout=60,
        message="the serving Deployment and Service, status.serve RollingOut",
    )
    kube.patch("FineTuneJob", name, namespace, {"spec": {"serve": None}})
    wait_until(
        lambda: (
            kube.get("Deployment", f"{name}-serve", namespace) is None
            and kube.get("Service", f"{name}-serve", namespace) is None
        ),
        timeout=60,
        message="the serving Deployment and Service deleted",
    )


def test_under_the_charts_role_a_lost_nodes_restart_is_a_disruption(
    restricted: str, kube: Kube, wait_until: Callable[..., Any]
) -> None:
    """The chart lets the operator read Nodes (get, cluster-wide): the node of a pod that never
    reported its end decides whether a failed attempt was lost with it."""
    namespace, name, node = restricted, "nodeloss", f"{restricted}-node"
    create_node(kube, node)
    try:
        kube.apply(ftj_manifest(name, namespace, runPolicy={"backoffLimit": 0}))
        pods = wait_until(
            lambda: (
                len(p := kube.list("Pod", namespace, labels=f"finetune.dev/job-name={name}")) == 2
                and sorted(p, key=lambda x: x["metadata"]["labels"][COMPLETION_INDEX])
            ),
            timeout=60,
            message="2 pods",
        )
        bind_pod(kube, namespace, pods[1]["metadata"]["name"], node)
        patch_pod_status(
            kube, namespace, pods[1]["metadata"]["name"], running_status(pods[1], "10.0.0.3")
        )
        set_node_ready(
            kube, node, "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status."
        )
        hung = '{"status": "Failed", "reason": "CollectiveTimeout", "message": "no step"}'
        patch_pod_status(
            kube, namespace, pods[0]["metadata"]["name"], terminated_status(pods[0], 1, hung)
        )
        status = wait_until(
            lambda: (s := ftj_status(kube, namespace, name)).get("disruptions") and s,
            timeout=30,
            message="the restart counted as a disruption",
        )
        assert (status["phase"], status["attempts"]) == ("Pending", 2)
        assert (
            f"node {node} of pod {pods[1]['metadata']['name']} is not ready"
            in (condition(status, "Running")["message"])
        )
    finally:
        kube.delete("Node", node, missing_ok=True)


# ---- helm test: the chart's test Pod's program, under the chart's Role for it ----------------


HELM_TEST_LABEL = "app.kubernetes.io/component=helm-test"


def as_helm_test(
    kube: Kube, admin: str, release: str, release_ns: str, watched: str, tmp: Path
) -> str:
    """The RBAC that `helm test` makes for `release` in `release_ns`, whose operator watches
    `watched`, created (all but the Pod, whose program the test runs here); a kubeconfig of
    its ServiceAccount."""
    docs = render_chart(
        release_ns,
        release,
        tmp,
        "--show-only",
        "templates/tests/operator-reconciles.yaml",
        "--set",
        f"watchNamespaces={{{watched}}}",
    )
    for doc in docs:
        if doc["kind"] != "Pod":
            kube.create(doc)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    return service_account_kubeconfig(kube, admin, release_ns, sa, tmp / "test-kubeconfig")


def selftest(config: str, namespace: str, timeout: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "finetune_operator.selftest"]
    return subprocess.run(
        [*command, "--namespace", namespace, "--timeout", str(timeout)],
        env={**os.environ, "KUBECONFIG": config},
        capture_output=True,
        text=True,
        timeout=2 * timeout + 60,
    )


def test_helm_test_passes_under_its_own_role_against_the_charts_operator(
    restricted: str, kube: Kube, kubeconfig: str, tmp_path: Path
) -> None:
    config = as_helm_test(kube, kubeconfig, "t-pass", restricted, restricted, tmp_path)
    done = selftest(config, restricted, 30)
    assert done.returncode == 0, done.stderr
    created, reconciled, deleted, verdict = done.stdout.splitlines()
    assert re.fullmatch(
        rf"created FineTuneJob {restricted}/helm-test-[0-9a-f]{{6}} \(runPolicy.suspend: true\)",
        created,
    )
    assert re.fullmatch(r"reconciled in [\d.]+s: phase Suspended, observedGeneration 1", reconciled)
    assert re.fullmatch(r"deleted in [\d.]+s", deleted)
    assert verdict == f"PASSED: the operator reconciles FineTuneJobs in {restricted}"
    assert not kube.list("FineTuneJob", restricted, labels=HELM_TEST_LABEL)


def test_helm_test_fails_saying_what_to_check_where_no_operator_watches(
    restricted: str, kube: Kube, kubeconfig: str, tmp_path: Path
) -> None:
    unwatched = kube.create_namespace("ftj-unwatched")
    try:
        config = as_helm_test(kube, kubeconfig, "t-fail", restricted, unwatched, tmp_path)
        done = selftest(config, unwatched, 3)
        assert done.returncode == 1, done.stdout
        assert f"FAILED: the operator did not reconcile FineTuneJob {unwatched}/" in done.stderr
        assert f"watchNamespaces include {unwatched}" in done.stderr
        # It deleted what it made, even so.
        assert not kube.list("FineTuneJob", unwatched, labels=HELM_TEST_LABEL)
    finally:
        kube.delete("Namespace", unwatched, missing_ok=True)
