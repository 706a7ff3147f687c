"""The Helm chart: lints, renders well-formed objects, least-privilege RBAC, a restricted pod.

Needs no cluster. helm comes from hack/helm.sh, which builds it from the Go module proxy on first
use (a few minutes, then cached under $FINETUNE_CACHE/helm/); without Go the tests skip.

    python -m pytest tests/unit/test_chart.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "ml-system"
# Value sets every structural test runs against.
VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "monitoring": [
        "--set",
        "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,"
        "monitoring.prometheusRule.enabled=true",
        "--set-json",
        'trainer.defaultResources={"requests":{"cpu":"2","memory":"8Gi"}}',
    ],
}
RBAC_KINDS = {"Role", "ClusterRole"}
HELM_HOME_VARS = ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")


@dataclass(frozen=True)
class Helm:
    binary: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm binary from hack/helm.sh, with its own config/cache/data dirs and no cluster."""
    if shutil.which("go") is None:
        pytest.fail("go is not installed: hack/helm.sh cannot build helm")
    proc = subprocess.run(
        [str(ROOT / "hack" / "helm.sh")], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, f"hack/helm.sh failed:\n{proc.stderr[-3000:]}"
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        **{var: str(home / var.lower()) for var in HELM_HOME_VARS},
        "KUBECONFIG": str(home / "no-kubeconfig"),  # never talk to a real cluster
    }
    return Helm(binary=proc.stdout.strip().splitlines()[-1], env=env)


def run_helm(helm: Helm, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm.binary, *args], capture_output=True, text=True, timeout=120, env=helm.env
    )


def template(helm: Helm, *args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    proc = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"want one {kind}, got {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


# ---- lint and render --------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint(helm: Helm, values: list[str], strict: bool) -> None:
    proc = run_helm(helm, "lint", str(CHART), *(["--strict"] if strict else []), *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_object_is_well_formed(helm: Helm, values: list[str]) -> None:
    docs = template(helm, *values)
    assert docs
    seen = set()
    for doc in docs:
        assert isinstance(doc, dict)
        for key in ("apiVersion", "kind", "metadata"):
            assert doc.get(key), f"object without {key}: {doc}"
        name = doc["metadata"].get("name")
        assert name and len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name)
        key = (doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace"), name)
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, doc["kind"]
        if doc["kind"] in {"Deployment", "Service", "ServiceAccount", "ConfigMap"}:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["kind"]


def test_deployment_runs_one_recreated_replica(helm: Helm) -> None:
    deployment = one(template(helm), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_operator_reads_every_setting_the_chart_passes(helm: Helm) -> None:
    """Each environment variable the Deployment sets is one `Settings.from_env` reads, and the
    values arrive: a chart value the operator ignored would fail here, not in production."""
    from finetune_operator.settings import Settings

    container = operator_container(
        template(helm, *VALUE_SETS["monitoring"], "--set", "trainer.image.pullPolicy=Always")
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

    settings = Settings.from_env(Recording(env))
    assert set(env) <= read, f"set by the chart, read by nobody: {sorted(set(env) - read)}"
    assert settings.trainer_image == "finetune-trainer:0.1.0"
    assert settings.image_pull_policy == "Always"
    assert settings.trainer_default_resources == {"requests": {"cpu": "2", "memory": "8Gi"}}
    assert settings.log_level == "INFO" and settings.namespaces == ()


def test_liveness_probe_and_no_readiness_probe(helm: Helm) -> None:
    container = operator_container(template(helm))
    assert "readinessProbe" not in container
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
    assert port == 8080
    env = {e["name"]: e.get("value") for e in container["env"]}
    # kopf must listen where the probe looks.
    assert env["FINETUNE_LIVENESS_ENDPOINT"] == "http://0.0.0.0:8080/healthz"


def test_startup_probe_makes_the_pod_ready_once_kopf_runs(helm: Helm) -> None:
    """Ready means the operator handles objects (kopf's endpoint answers once it runs), not that
    its container started: rollouts and the fault suite's operator restart wait for that."""
    container = operator_container(template(helm))
    probe = container["startupProbe"]
    assert probe["httpGet"] == container["livenessProbe"]["httpGet"]
    assert probe["periodSeconds"] == 1 and probe["periodSeconds"] * probe["failureThreshold"] >= 60
    slow = operator_container(template(helm, "--set", "startupProbe.failureThreshold=900"))
    assert slow["startupProbe"]["failureThreshold"] == 900


def test_operator_env_comes_from_values(helm: Helm) -> None:
    docs = template(
        helm,
        "--set",
        "trainer.image.repository=registry.example/trainer,trainer.image.tag=1.2.3,"
        "trainer.image.pullPolicy=Always,logLevel=debug,watchNamespaces={a,b}",
    )
    container = operator_container(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == "registry.example/trainer:1.2.3"
    assert env["FINETUNE_TRAINER_IMAGE_PULL_POLICY"] == "Always"
    assert env["FINETUNE_WATCH_NAMESPACES"] == "a,b"
    assert env["FINETUNE_METRICS_PORT"] == "8000"
    assert env["FINETUNE_LOG_LEVEL"] == "debug"
    assert container["image"] == "finetune-operator:0.1.0"  # tag defaults to appVersion


def test_defaults_match_the_image_tags(helm: Helm) -> None:
    """Chart appVersion, pyproject version and the default image tags agree (hack/images.sh)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    env = {e["name"]: e.get("value") for e in operator_container(template(helm))["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == f"finetune-trainer:{project['version']}"


def test_metrics_service_selects_the_operator_pod(helm: Helm) -> None:
    docs = template(helm)
    service = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", 8000, "metrics")
    container_ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    assert container_ports["metrics"] == 8000


# ---- security ---------------------------------------------------------------------------------


def test_operator_pod_meets_pod_security_restricted(helm: Helm) -> None:
    """The checks of the Pod Security Standard "restricted" profile that apply to this pod."""
    docs = template(helm)
    pod, container = one(docs, "Deployment")["spec"]["template"]["spec"], operator_container(docs)
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host)
    assert sc.get("privileged") is not True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    # Our own rule on top: a read-only root with /tmp as the only writable mount.
    assert sc.get("readOnlyRootFilesystem") is True
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    restricted_volume_types = {"emptyDir", "configMap", "secret", "projected", "downwardAPI",
                               "persistentVolumeClaim", "ephemeral", "csi"}  # fmt: skip
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= restricted_volume_types, volume


def rules_of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for doc in by_kind(docs, kind) for rule in doc.get("rules", [])]


def assert_least_privilege(rules: list[dict[str, Any]]) -> None:
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"wildcard {field} in {rule}"
        assert not rule.get("nonResourceURLs"), rule
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
        # Secrets: at most `get` by name (rbac.getSecrets), never list/watch or writes.
        if any(r.split("/")[0] == "secrets" for r in rule["resources"]):
            assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], rule


def test_default_rbac_is_one_least_privilege_cluster_role(helm: Helm) -> None:
    docs = template(helm)
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    role, binding = one(docs, "ClusterRole"), one(docs, "ClusterRoleBinding")
    assert_least_privilege(role["rules"])
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    for need in [
        ("finetune.dev", "finetunejobs", "watch"),
        ("finetune.dev", "finetunejobs", "patch"),
        ("finetune.dev", "finetunejobs/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("", "pods", "watch"),
        ("", "configmaps", "patch"),
        # Read before any write: a name someone else holds is never applied over.
        ("", "configmaps", "get"),
        ("", "services", "get"),
        ("", "services", "create"),
        ("", "events", "create"),
        # A Job's FailedCreate Events: why its pods cannot be created.
        ("", "events", "list"),
        ("events.k8s.io", "events", "create"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        # runPolicy.suspend of a queued Job goes through its Kueue Workload's spec.active.
        ("kueue.x-k8s.io", "workloads", "list"),
        ("kueue.x-k8s.io", "workloads", "watch"),
        ("kueue.x-k8s.io", "workloads", "patch"),
    ]:
        assert need in granted, f"missing {need}"
    # Of Kueue's objects only Workloads, never created or deleted: Kueue owns them.
    assert {v for g, r, v in granted if g == "kueue.x-k8s.io"} == {"list", "watch", "patch"}
    assert {r for g, r, v in granted if g == "kueue.x-k8s.io"} == {"workloads"}
    # Pods are created by the Job controller, never by the operator.
    assert not {v for g, r, v in granted if r == "pods"} - {"get", "list", "watch"}
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }  # fmt: skip
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_watch_namespaces_gives_roles_and_no_cluster_wide_workload_rules(helm: Helm) -> None:
    docs = template(helm, "--set", "watchNamespaces={a,b}")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["a", "b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    for role in roles:
        assert_least_privilege(role["rules"])
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert {"finetunejobs", "jobs", "pods", "configmaps", "services", "workloads"} <= resources
    # Cluster-wide only reads: what kopf needs to discover things, and the StorageClasses that
    # decide where a one-node gang's checkpoints go.
    cluster_rules = rules_of(docs, "ClusterRole")
    assert_least_privilege(cluster_rules)
    for rule in cluster_rules:
        allowed = {"customresourcedefinitions", "namespaces", "storageclasses"}
        assert set(rule["resources"]) <= allowed, rule
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    for binding in by_kind(docs, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"].endswith("-cluster")


def test_secret_access_can_be_withheld(helm: Helm) -> None:
    for values in ([], ["--set", "watchNamespaces={a}"]):
        docs = template(helm, *values, "--set", "rbac.getSecrets=false")
        resources = {r for kind in RBAC_KINDS for rule in rules_of(docs, kind)
                     for r in rule["resources"]}  # fmt: skip
        assert "secrets" not in resources and "finetunejobs" in resources


def test_rbac_can_be_left_to_the_installer(helm: Helm) -> None:
    docs = template(helm, "--set", "rbac.create=false")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


# ---- CRD --------------------------------------------------------------------------------------


def test_chart_crd_is_byte_identical_to_generated(helm: Helm) -> None:
    generated = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
    assert (CHART / "crds" / generated.name).read_bytes() == generated.read_bytes()
    assert [p.name for p in (CHART / "crds").iterdir()] == [generated.name]
    # ... and helm ships it: `helm show crds` prints the crds/ directory.
    proc = run_helm(helm, "show", "crds", str(CHART))
    assert proc.returncode == 0, proc.stderr
    (crd,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert crd == yaml.safe_load(generated.read_text())


# ---- values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=2"],  # no such key: the operator always runs one replica
        ["--set", "watchNamespace={a}"],  # typo of watchNamespaces
        ["--set", "watchNamespaces={Team_A}"],  # not a namespace name
        ["--set", "logLevel=verbose"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set", "image.registry=x"],
        ["--set", "monitoring.serviceMonitor.interval=thirty"],
        ["--set", "monitoring.prometheusRule.stalledMinutes=0"],
        ["--set", "monitoring.podMonitor.enabled=yes"],
        ["--set", "trainer.defaultResources.request.cpu=1"],
        ["--set", "metrics.port=0"],
    ],
    ids=lambda bad: bad[1],
)
def test_schema_rejects_bad_values(helm: Helm, bad: list[str]) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), *bad)
    assert proc.returncode != 0, f"{bad} was accepted"
    assert "schema" in proc.stderr, proc.stderr


def test_schema_closes_the_top_level() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]), "values.yaml and the schema disagree"


def test_monitoring_values_contract() -> None:
    """The keys and defaults the observability templates are built against."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["monitoring"] == {
        "serviceMonitor": {"enabled": False, "interval": "30s", "labels": {}},
        "podMonitor": {"enabled": False, "interval": "15s", "labels": {}, "processesPerNode": 8},
        "prometheusRule": {
            "enabled": False, "labels": {}, "stalledMinutes": 10, "pendingMinutes": 15,
            "operatorJob": "", "runbookBaseURL": "",
        },
        "dashboards": {
            "enabled": True, "label": "grafana_dashboard", "labelValue": "1", "namespace": "",
        },
    }  # fmt: skip


# ---- NOTES ------------------------------------------------------------------------------------


def render_notes(helm: Helm, tmp_path: Path, *args: str) -> str:
    """NOTES.txt is only rendered by install/upgrade, which need a cluster. Render it through a
    copy of the chart with one extra template that includes it."""
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ include "finetune-operator/templates/NOTES.txt" . | toJson }}\n'
    )
    proc = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                    "--show-only", "templates/zz-notes.yaml", *args)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["notes"]


def test_notes_example_is_a_valid_finetunejob(helm: Helm, tmp_path: Path) -> None:
    from finetune_api.validation import load_manifest

    notes = render_notes(helm, tmp_path, "--set", "watchNamespaces={team-a}")
    assert "kubectl -n team-a get ftj -w" in notes
    assert f"rollout status deployment/{RELEASE}-finetune-operator" in notes
    match = re.search(r"<<'YAML'\n(.*?)\n\s*YAML\n", notes, re.S)
    assert match, notes
    manifest = tmp_path / "example.yaml"
    manifest.write_text(textwrap.dedent(match.group(1)))
    job = load_manifest(manifest)  # raises on anything the schema would reject
    assert job.metadata.name in notes.split("describe ftj ")[1]
