"""The Helm chart: lints, renders well-formed objects, least-privilege RBAC, a restricted pod,
the CRD as a template, images with a registry, a subchart's values, the aggregated user roles,
the optional NetworkPolicy, and its README generated from values.yaml.

Needs no cluster. helm comes from hack/helm.sh, which builds it from the Go module proxy on first
use (a few minutes, then cached under $FINETUNE_CACHE/helm/); without Go the tests skip.

    python -m pytest tests/unit/test_chart.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack_scripts import hack_script

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
    "network-policy": ["--set", "networkPolicy.enabled=true,global.imageRegistry=mirror.example"],
    "standby": ["--set", "replicaCount=2"],
}
RBAC_KINDS = {"Role", "ClusterRole"}
AGGREGATE_LABEL = "rbac.authorization.k8s.io/aggregate-to-"
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


# libyaml's loader where PyYAML has it: the same documents, parsed ten times as fast (0.02 s
# against 0.23 s for a render of the default values, three times helm's own 0.08 s).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# `helm template`'s output by its arguments. It is a pure function of them and of the chart's
# files, which no test changes, and 15 of this module's 52 renders were of the default values.
_RENDERED: dict[tuple[tuple[str, ...], Path, bool], str] = {}


def template(
    helm: Helm, *args: str, chart: Path = CHART, tests: bool = False
) -> list[dict[str, Any]]:
    """The chart's objects as `helm install` makes them; with `tests`, also `helm test`'s. Each
    call parses them anew, so a test may change what it gets."""
    key = (args, chart, tests)
    if key not in _RENDERED:
        skip = [] if tests else ["--skip-tests"]
        command = ("template", RELEASE, str(chart), "--namespace", NAMESPACE, *skip, *args)
        proc = run_helm(helm, *command)
        assert proc.returncode == 0, proc.stderr
        _RENDERED[key] = proc.stdout
    return [doc for doc in yaml.load_all(_RENDERED[key], YAML_LOADER) if doc is not None]


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


def test_deployment_runs_one_replica_that_rolls_through_a_standby(helm: Helm) -> None:
    deployment = one(template(helm), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # The new pod stands by before the old one stops (the Lease keeps them from both acting).
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_operator_reads_every_setting_the_chart_passes(helm: Helm) -> None:
    """Each environment variable the Deployment sets is one `Settings.from_env` or
    `leader.from_env` reads, and the values arrive: a chart value the operator ignored would
    fail here, not in production."""
    from finetune_operator import leader
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
    lease = leader.from_env(Recording(env))
    assert set(env) <= read, f"set by the chart, read by nobody: {sorted(set(env) - read)}"
    # The Lease the chart's Role lets it create and renew, in the release namespace.
    assert lease is not None
    assert (lease.namespace, lease.name) == (NAMESPACE, f"{RELEASE}-finetune-operator")
    assert lease.timing == leader.Timing(15, 10, 2)
    assert settings.trainer_image == "ghcr.io/finetune-operator/trainer:0.1.0"
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
        "trainer.image.registry=registry.example,trainer.image.repository=trainer,"
        "trainer.image.tag=1.2.3,trainer.image.pullPolicy=Always,logLevel=debug,"
        "watchNamespaces={a,b}",
    )
    container = operator_container(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == "registry.example/trainer:1.2.3"
    assert env["FINETUNE_TRAINER_IMAGE_PULL_POLICY"] == "Always"
    assert env["FINETUNE_WATCH_NAMESPACES"] == "a,b"
    assert env["FINETUNE_METRICS_PORT"] == "8000"
    assert env["FINETUNE_LOG_LEVEL"] == "debug"
    # The tag defaults to the appVersion; the registry to ghcr.io.
    assert container["image"] == "ghcr.io/finetune-operator/operator:0.1.0"


def test_default_images_have_a_registry_and_agree_with_the_operator(helm: Helm) -> None:
    """`helm install` with the defaults pulls pullable images: both carry a registry, the tag is
    the project's version, and the trainer image is the operator's own built-in default, so a
    pod gets the same image with or without the chart."""
    from finetune_operator.settings import DEFAULT_TRAINER_IMAGE

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    container = operator_container(template(helm))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == DEFAULT_TRAINER_IMAGE
    for ref in (container["image"], env["FINETUNE_TRAINER_IMAGE"]):
        registry, _, rest = ref.partition("/")
        assert "." in registry and rest.endswith(f":{project['version']}"), ref


@pytest.mark.parametrize(
    ("values", "operator", "trainer"),
    [
        # One mirror for every image: global.imageRegistry replaces each image's registry.
        (
            ["--set", "global.imageRegistry=mirror.example:5000/ml"],
            "mirror.example:5000/ml/finetune-operator/operator:0.1.0",
            "mirror.example:5000/ml/finetune-operator/trainer:0.1.0",
        ),
        (
            ["--set", "global.imageRegistry=mirror.example,image.registry=other.example"],
            "mirror.example/finetune-operator/operator:0.1.0",
            "mirror.example/finetune-operator/trainer:0.1.0",
        ),
        # Per image, and none at all (images built locally and loaded into kind).
        (
            ["--set", "image.registry=a.example,trainer.image.registry=b.example"],
            "a.example/finetune-operator/operator:0.1.0",
            "b.example/finetune-operator/trainer:0.1.0",
        ),
        (
            ["--set-string", "image.registry=,trainer.image.registry=", "--set",
             "image.repository=finetune-operator,trainer.image.repository=finetune-trainer"],
            "finetune-operator:0.1.0",
            "finetune-trainer:0.1.0",
        ),
    ],
    ids=["global", "global-wins", "per-image", "local"],
)  # fmt: skip
def test_image_registry(helm: Helm, values: list[str], operator: str, trainer: str) -> None:
    container = operator_container(template(helm, *values))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (container["image"], env["FINETUNE_TRAINER_IMAGE"]) == (operator, trainer)


def test_works_as_a_subchart(helm: Helm, tmp_path: Path) -> None:
    """An umbrella chart passes `global` (any keys, its own included) and the dependency's
    `enabled` condition to this chart: the strict schema accepts both, and global.imageRegistry
    reaches the images."""
    values = tmp_path / "umbrella.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "enabled": True,
                "global": {"imageRegistry": "mirror.example", "storageClass": "fast", "x": {}},
            }
        )
    )
    docs = template(helm, "-f", str(values))
    assert operator_container(docs)["image"] == "mirror.example/finetune-operator/operator:0.1.0"
    proc = run_helm(helm, "lint", str(CHART), "--strict", "-f", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... through a real umbrella chart, with this one as its dependency.
    umbrella = tmp_path / "umbrella"
    (umbrella / "charts").mkdir(parents=True)
    shutil.copytree(CHART, umbrella / "charts" / CHART.name)
    (umbrella / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "platform",
                "version": "1.0.0",
                "dependencies": [
                    {"name": CHART.name, "version": "*", "condition": f"{CHART.name}.enabled"}
                ],
            }
        )
    )
    umbrella_values = {"global": {"imageRegistry": "mirror.example"}, CHART.name: {"enabled": True}}
    (umbrella / "values.yaml").write_text(yaml.safe_dump(umbrella_values))
    docs = template(helm, chart=umbrella)
    assert operator_container(docs)["image"] == "mirror.example/finetune-operator/operator:0.1.0"
    off = template(helm, "--set", f"{CHART.name}.enabled=false", chart=umbrella)
    assert not by_kind(off, "Deployment")


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


def is_aggregated(doc: dict[str, Any]) -> bool:
    """A ClusterRole for users (rbac.aggregateRoles), not for the operator."""
    return any(k.startswith(AGGREGATE_LABEL) for k in doc["metadata"].get("labels", {}))


LEADER_ELECTION = f"{RELEASE}-finetune-operator-leader-election"


def operator_roles(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The roles (or bindings) of the watched workloads: not the aggregated user roles, nor
    the leader election's own Role."""
    return [
        doc
        for doc in by_kind(docs, kind)
        if not is_aggregated(doc) and doc["metadata"]["name"] != LEADER_ELECTION
    ]


def rules_of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for doc in operator_roles(docs, kind) for rule in doc.get("rules", [])]


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
    assert not operator_roles(docs, "Role") and not operator_roles(docs, "RoleBinding")
    (role,) = operator_roles(docs, "ClusterRole")
    binding = one(docs, "ClusterRoleBinding")
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
        # The retained-claim metrics follow the operator's checkpoint claims.
        ("", "persistentvolumeclaims", "watch"),
        # A FineTuneJob that keeps its claim as it is deleted removes its other children.
        ("", "configmaps", "delete"),
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
    roles = operator_roles(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    bindings = operator_roles(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["a", "b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    for role in roles:
        assert_least_privilege(role["rules"])
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert {"finetunejobs", "jobs", "pods", "configmaps", "services", "workloads"} <= resources
    # Cluster-wide only reads: what kopf needs to discover things, the StorageClasses that
    # decide where a one-node gang's checkpoints go, and the Nodes that tell a lost node.
    cluster_rules = rules_of(docs, "ClusterRole")
    assert_least_privilege(cluster_rules)
    for rule in cluster_rules:
        allowed = {"customresourcedefinitions", "namespaces", "storageclasses", "nodes"}
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


def test_aggregate_roles_for_namespace_users(helm: Helm) -> None:
    """admin/edit/view ClusterRoles that aggregate into the built-in roles: edit and admin may
    write FineTuneJobs, view only read them, and nobody but the operator writes status."""
    docs = template(helm)
    roles = {d["metadata"]["name"]: d for d in by_kind(docs, "ClusterRole") if is_aggregated(d)}
    fullname = f"{RELEASE}-finetune-operator"
    assert set(roles) == {f"{fullname}-{r}" for r in ("admin", "edit", "view")}
    read = {"get", "list", "watch"}
    write = {"create", "update", "patch", "delete", "deletecollection"}
    for suffix in ("admin", "edit", "view"):
        role = roles[f"{fullname}-{suffix}"]
        labels = role["metadata"]["labels"]
        assert {k for k in labels if k.startswith(AGGREGATE_LABEL)} == {AGGREGATE_LABEL + suffix}
        assert labels[AGGREGATE_LABEL + suffix] == "true"
        assert {g for rule in role["rules"] for g in rule["apiGroups"]} == {"finetune.dev"}
        granted = {(r, v) for rule in role["rules"] for r in rule["resources"]
                   for v in rule["verbs"]}  # fmt: skip
        jobs = read if suffix == "view" else read | write
        want = {("finetunejobs", v) for v in jobs} | {("finetunejobs/status", v) for v in read}
        assert granted == want, suffix
    # Users' roles are no part of the operator's: its bindings name only its own roles.
    for binding in by_kind(docs, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"] not in roles
    off = template(helm, "--set", "rbac.aggregateRoles=false")
    assert not [d for d in by_kind(off, "ClusterRole") if is_aggregated(d)]


def network_policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "NetworkPolicy")["spec"]


def test_network_policy_is_off_by_default(helm: Helm) -> None:
    assert not by_kind(template(helm), "NetworkPolicy")


def test_network_policy_admits_metrics_and_reaches_apiserver_dns_and_trainers(helm: Helm) -> None:
    from finetune_api.pod import METRICS_PORT
    from finetune_operator import naming

    docs = template(helm, "--set", "networkPolicy.enabled=true")
    policy = one(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    spec = policy["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # In: the metrics port only, from anywhere by default. No probe rule: the kubelet is on the
    # pod's node, which NetworkPolicy always admits.
    assert spec["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    api, dns, trainers, servers = spec["egress"]
    assert api == {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert "to" not in dns
    # The operator scrapes rank 0's first metrics port, in pods labelled as naming.py does.
    assert trainers["ports"] == [{"protocol": "TCP", "port": METRICS_PORT}]
    (peer,) = trainers["to"]
    selector = peer["podSelector"]["matchLabels"]
    assert selector.items() <= naming.child_labels("any-job").items()
    assert "finetune.dev/job-name" not in selector and peer["namespaceSelector"] == {}
    # spec.serve's smoke request reaches the serving pods' port, in pods labelled as naming.py
    # labels them.
    from finetune_api.pod import SERVE_PORT

    assert servers["ports"] == [{"protocol": "TCP", "port": SERVE_PORT}]
    (peer,) = servers["to"]
    assert peer["podSelector"]["matchLabels"] == {
        k: v for k, v in naming.serve_labels("any-job").items() if k != naming.LABEL_SERVED_JOB
    }


def test_network_policy_values(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "np.yaml"
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    proxy = {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 3128}]}
    values.write_text(
        yaml.safe_dump(
            {
                "watchNamespaces": ["team-a", "team-b"],
                "networkPolicy": {
                    "enabled": True,
                    "metricsFrom": [prometheus],
                    "apiServerPorts": [6443],
                    "apiServerCIDRs": ["172.18.0.2/32"],
                    "extraEgress": [proxy],
                },
            }
        )
    )
    spec = network_policy(template(helm, "-f", str(values)))
    assert spec["ingress"][0]["from"] == [prometheus]
    api, _, trainers, servers, extra = spec["egress"]
    assert api == {
        "ports": [{"protocol": "TCP", "port": 6443}],
        "to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}],
    }
    assert trainers["to"][0]["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]
    }
    assert servers["to"][0]["namespaceSelector"] == trainers["to"][0]["namespaceSelector"]
    assert extra == proxy


def test_the_leader_election_role_creates_and_renews_only_its_lease(helm: Helm) -> None:
    for values in ([], ["--set", "watchNamespaces={a}"]):
        docs = template(helm, *values)
        (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == LEADER_ELECTION]
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                # The Lease the operator is told to hold (test_the_operator_reads_every_...).
                "resourceNames": [f"{RELEASE}-finetune-operator"],
                "verbs": ["get", "update"],
            },
        ]
        (binding,) = [
            b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["name"] == LEADER_ELECTION
        ]
        sa = one(docs, "ServiceAccount")["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}
        ]
    off = template(helm, "--set", "leaderElection.enabled=false")
    assert not by_kind(off, "Role")
    assert "FINETUNE_LEADER_ELECTION" not in {e["name"] for e in operator_container(off)["env"]}


def test_standbys_need_the_lease_and_spread_over_nodes(helm: Helm) -> None:
    deployment = one(template(helm, "--set", "replicaCount=2"), "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    # Scaling changes no pod template: `helm upgrade --set replicaCount=2` adds a standby and
    # restarts no operator.
    one_pod = one(template(helm), "Deployment")
    assert one_pod["spec"]["template"] == deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["spec"]["topologySpreadConstraints"] == [
        {
            "labelSelector": {"matchLabels": selector},
            "matchLabelKeys": ["pod-template-hash"],
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ]
    # The installer's own constraints replace the default; each gets the pods' selector unless
    # it names one.
    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone"}
    own = [
        {**zone, "whenUnsatisfiable": "DoNotSchedule"},
        {
            **zone,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"a": "b"}},
        },
    ]
    spread = one(
        template(
            helm,
            "--set",
            "replicaCount=3",
            "--set-json",
            f"topologySpreadConstraints={json.dumps(own)}",
        ),
        "Deployment",
    )["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == [{**own[0], "labelSelector": {"matchLabels": selector}}, own[1]]

    # A drain evicts one at a time, leaving one to act; with one pod, no budget to block it.
    budget = one(template(helm, "--set", "replicaCount=2"), "PodDisruptionBudget")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    assert not by_kind(template(helm), "PodDisruptionBudget")
    no_budget = ["--set", "replicaCount=2", "--set", "podDisruptionBudget.enabled=false"]
    assert not by_kind(template(helm, *no_budget), "PodDisruptionBudget")

    # Without the Lease, two pods would both act: refused, saying what to change; one pod is
    # recreated, never rolled.
    proc = run_helm(
        helm, "template", RELEASE, str(CHART),
        "--set", "replicaCount=2", "--set", "leaderElection.enabled=false",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "replicaCount is 2, but leaderElection.enabled is false" in proc.stderr
    assert "Enable leaderElection, or set replicaCount to 1" in proc.stderr
    off = one(template(helm, "--set", "leaderElection.enabled=false"), "Deployment")
    assert (off["spec"]["replicas"], off["spec"]["strategy"]) == (1, {"type": "Recreate"})


def test_rbac_can_be_left_to_the_installer(helm: Helm) -> None:
    docs = template(helm, "--set", "rbac.create=false", tests=True)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    # Nor `helm test`'s: it would need a Role of its own.
    assert not [d for d in docs if hook_of(d)]


# ---- helm test ---------------------------------------------------------------------------------


def hook_of(doc: dict[str, Any]) -> str | None:
    return (doc["metadata"].get("annotations") or {}).get("helm.sh/hook")


def test_helm_test_reconciles_a_job_as_a_user_that_may_do_only_that(helm: Helm) -> None:
    docs = template(helm, tests=True)
    tests = [d for d in docs if hook_of(d) == "test"]
    assert sorted(d["kind"] for d in tests) == ["Pod", "Role", "RoleBinding", "ServiceAccount"]
    pod, role, binding, account = (
        one(tests, k) for k in ("Pod", "Role", "RoleBinding", "ServiceAccount")
    )
    # What a user does with a FineTuneJob, and nothing else.
    assert role["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs"],
            "verbs": ["create", "get", "delete"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == operator_container(template(helm))["image"]
    assert container["command"] == ["python", "-m", "finetune_operator.selftest"]
    assert container["args"] == ["--namespace", NAMESPACE, "--timeout", "60"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The RBAC goes once the test passed; the Pod stays for `helm test --logs`.
    for doc in (role, binding, account):
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook-weight"] == "-1"
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation"
    # Nothing of the operator's selects the test Pod: not the Deployment, its metrics Service,
    # its PodDisruptionBudget or its NetworkPolicy.
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "helm-test"
    installed = template(helm, "--set", "networkPolicy.enabled=true", "--set", "replicaCount=2")
    selectors = [
        one(installed, "Deployment")["spec"]["selector"]["matchLabels"],
        one(installed, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(installed, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        *(s["spec"]["selector"] for s in by_kind(installed, "Service")),
    ]
    assert len(selectors) >= 4
    for selector in selectors:
        assert not selector.items() <= labels.items(), selector


@pytest.mark.parametrize(
    ("watched", "target"),
    [(["a", "b"], "a"), (["a", NAMESPACE], NAMESPACE), ([], NAMESPACE)],
)
def test_helm_test_runs_where_the_operator_watches(
    helm: Helm, watched: list[str], target: str
) -> None:
    rendered = template(helm, "--set-json", f"watchNamespaces={json.dumps(watched)}", tests=True)
    docs = [d for d in rendered if hook_of(d)]
    assert one(docs, "Role")["metadata"]["namespace"] == target
    assert one(docs, "RoleBinding")["metadata"]["namespace"] == target
    assert one(docs, "Pod")["metadata"]["namespace"] == NAMESPACE
    assert one(docs, "Pod")["spec"]["containers"][0]["args"][:2] == ["--namespace", target]


def test_helm_test_can_be_left_out(helm: Helm, tmp_path: Path) -> None:
    docs = template(helm, "--set", "tests.enabled=false", tests=True)
    assert not [d for d in docs if hook_of(d)]
    # The notes name `helm test` only where there is one.
    command = f"helm test {RELEASE} -n {NAMESPACE} --logs"
    assert command in render_notes(helm, tmp_path / "with")
    assert command not in render_notes(helm, tmp_path / "without", "--set", "tests.enabled=false")


# ---- CRD --------------------------------------------------------------------------------------


def crd_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "CustomResourceDefinition")


def test_the_chart_templates_the_generated_crd(helm: Helm) -> None:
    """The CRD is a template, so that `helm upgrade` updates it: the generated CRD itself plus
    the release's labels and the keep policy. Nothing in the chart's crds/ directory, which helm
    would install a second time (and never upgrade)."""
    from finetune_api import crd

    generated = yaml.safe_load(crd.CRD_FILE.read_text())
    assert crd.CHART_CRD_TEMPLATE.is_relative_to(CHART / "templates")
    rendered = crd_of(template(helm))
    metadata = rendered.pop("metadata")
    assert rendered == {k: v for k, v in generated.items() if k != "metadata"}
    assert metadata["name"] == generated["metadata"]["name"]
    assert metadata["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert metadata["labels"]["app.kubernetes.io/component"] == "crd"
    assert not (CHART / "crds").exists()
    proc = run_helm(helm, "show", "crds", str(CHART))
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_crd_switches(helm: Helm) -> None:
    assert not by_kind(template(helm, "--set", "crds.install=false"), "CustomResourceDefinition")
    unkept = crd_of(template(helm, "--set", "crds.keep=false"))
    assert "annotations" not in unkept["metadata"]


def test_the_crd_generator_keeps_go_template_syntax_literal(helm: Helm, tmp_path: Path) -> None:
    """A `{{` in the CRD (a CEL rule, a description) must reach the cluster as written, not be
    read by helm as a template action."""
    from finetune_api import crd

    doc = crd.build_crd()
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["description"] = "{{ .Release.Name }} }} literal"
    text = crd.HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    (chart / "templates" / "crd" / crd.CHART_CRD_TEMPLATE.name).write_text(
        crd.render_chart_template(text)
    )
    spec = crd_of(template(helm, chart=chart))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert spec["properties"]["spec"]["description"] == "{{ .Release.Name }} }} literal"


def test_the_crd_check_covers_the_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m finetune_api.crd --check` fails on a stale chart template and on a CRD put
    back into the chart's crds/ directory."""
    from finetune_api import crd

    assert crd.main(["--check"]) == 0
    template_copy = tmp_path / "template.yaml"
    template_copy.write_text(crd.CHART_CRD_TEMPLATE.read_text().replace("FineTuneJob", "Stale", 1))
    monkeypatch.setattr(crd, "CHART_CRD_TEMPLATE", template_copy)
    assert crd.main(["--check"]) == 1
    monkeypatch.undo()
    monkeypatch.setattr(crd, "CHART_CRDS_DIR", tmp_path)  # exists
    assert crd.main(["--check"]) == 1


# ---- values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=0"],  # one pod at least
        ["--set-json", 'topologySpreadConstraints=[{"maxSkew":1}]'],  # no topologyKey
        ["--set", "watchNamespace={a}"],  # typo of watchNamespaces
        ["--set", "watchNamespaces={Team_A}"],  # not a namespace name
        ["--set", "logLevel=verbose"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set", "image.registry=https://ghcr.io"],  # a host, not a URL
        ["--set", "global.imageRegistry=ghcr.io/"],
        ["--set", "enabled=maybe"],
        ["--set", "crds.install=yes"],
        ["--set", "crds.upgrade=true"],
        ["--set", "rbac.aggregateRoles=1"],
        ["--set", "networkPolicy.apiServerPorts={}"],
        ["--set", "networkPolicy.apiServerCIDRs={10.0.0.1}"],
        ["--set", "networkPolicy.egress={}"],
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
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # `enabled` is no value of this chart's: only an umbrella chart's condition sets it.
    assert set(values) | {"enabled"} == set(schema["properties"]), "values.yaml != the schema"
    assert "additionalProperties" not in schema["properties"]["global"]  # any keys


def test_monitoring_values_contract() -> None:
    """The keys and defaults the observability templates are built against."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["monitoring"] == {
        "serviceMonitor": {"enabled": False, "interval": "30s", "labels": {}},
        "podMonitor": {
            "enabled": False, "interval": "15s", "labels": {}, "finalScrapeSeconds": 20,
            "processesPerNode": 8,
        },
        "prometheusRule": {
            "enabled": False, "labels": {}, "stalledMinutes": 10, "pendingMinutes": 15,
            "retainedClaimDays": 7, "operatorJob": "", "runbookBaseURL": "",
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
    return yaml.load(proc.stdout, YAML_LOADER)["notes"]


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


def test_notes_point_at_the_acting_pod_when_some_stand_by(helm: Helm, tmp_path: Path) -> None:
    """`port-forward deployment/...` picks any pod, a standby's metrics included: with standbys
    the notes find the Lease's holder instead."""
    fullname = f"{RELEASE}-finetune-operator"
    one_pod = render_notes(helm, tmp_path / "one")
    assert f"port-forward deployment/{fullname} 8000" in one_pod
    assert "holderIdentity" not in one_pod
    two = render_notes(helm, tmp_path / "two", "--set", "replicaCount=2")
    assert f"port-forward deployment/{fullname}" not in two
    lease = f"get lease {fullname} -o jsonpath='{{.spec.holderIdentity}}' | cut -d_ -f1)"
    assert lease in two
    assert 'port-forward "pod/$POD" 8000' in two


# ---- README -----------------------------------------------------------------------------------


def test_readme_is_generated_from_values() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "chart-readme.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr + " (run hack/chart-readme.py)"
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Every value is in the table, with its default.
    for path, value, leaf in hack_script("chart-readme.py")._leaves(values):
        if leaf:
            assert f"| {path} | " in readme and f"`{json.dumps(value)}`" in readme, path
    for section in ("## Install", "## Upgrade", "## Uninstall", "## Network policies"):
        assert section in readme


def test_readme_generator_reads_helm_docs_comments(tmp_path: Path) -> None:
    module = hack_script("chart-readme.py")
    text = textwrap.dedent(
        """\
        # A section comment, not a description.
        image:
          # -- Registry of the image,
          # continued | here.
          registry: ghcr.io
          tag: ""
        # -- A whole map.
        resources:
          limits: {memory: 1Gi}
        """
    )
    assert module.values_table(text).splitlines()[2:] == [
        '| image.registry | string | `"ghcr.io"` | Registry of the image, continued \\| here. |',
        '| image.tag | string | `""` |  |',
        '| resources | object | `{"limits": {"memory": "1Gi"}}` | A whole map. |',
        '| resources.limits.memory | string | `"1Gi"` |  |',
    ]
    with pytest.raises(module.ValuesCommentError):
        module.values_table("# -- dangling\n\nkey: 1\n")
    # A stale README is found: the check compares with a fresh render.
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    before = module.render(chart)
    values = chart / "values.yaml"
    old = "# -- Pull policy of the operator image."
    values.write_text(values.read_text().replace(old, "# -- New."))
    after = module.render(chart)
    assert after != before
    assert '| image.pullPolicy | string | `"IfNotPresent"` | New. |' in after


def test_documented_wait_condition_is_the_api_condition() -> None:
    """`kubectl wait --for=condition=Succeeded` as the README and docs/api.md say: the condition
    type the operator sets (finetune_api.constants), which docs/api.md lists."""
    from finetune_api.constants import ConditionType

    readme = (CHART / "README.md").read_text()
    waits = re.findall(r"kubectl wait --for=condition=(\w+) ftj/", readme)
    assert waits == [ConditionType.SUCCEEDED.value]
    api = (ROOT / "docs" / "api.md").read_text()
    listed = re.search(r"conditions: \[\].*types include (.*)$", api, re.M)
    assert listed and listed.group(1).split(", ") == [c.value for c in ConditionType]
    # kubectl explain ftj.status.conditions names every type too.
    from finetune_api.v1alpha1 import FineTuneJobStatus

    explained = FineTuneJobStatus.model_fields["conditions"].description or ""
    assert all(c.value in explained for c in ConditionType), explained
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert f"--for=condition={ConditionType.SUCCEEDED.value} ftj/" in notes


def test_readme_documents_the_finalizer_the_operator_sets() -> None:
    """The uninstall section names the finalizer handlers.py configures, and the recovery patch."""
    handlers = (ROOT / "operator" / "finetune_operator" / "handlers.py").read_text()
    assert 'settings.persistence.finalizer = f"{GROUP}/finalizer"' in handlers
    from finetune_api.constants import GROUP

    readme = (CHART / "README.md").read_text()
    uninstall = readme.split("## Uninstall")[1].split("\n## ")[0]
    assert f"`{GROUP}/finalizer`" in uninstall
    assert "kubectl delete finetunejobs --all --all-namespaces --wait" in uninstall
    assert uninstall.index("kubectl delete finetunejobs") < uninstall.index("helm uninstall")
    patch = re.search(r"-p '(\[.*?\])'", uninstall)
    assert patch and json.loads(patch.group(1)) == [
        {"op": "remove", "path": "/metadata/finalizers"}
    ]


def test_readme_trainer_network_policy_selects_trainer_pods() -> None:
    """The example policy for trainer namespaces selects the pods render.py makes and opens
    what they need: each other (rendezvous), metrics to the operator, DNS and HTTPS out."""
    from finetune_api.pod import METRICS_PORT
    from finetune_operator import naming

    readme = (CHART / "README.md").read_text()
    (example,) = [
        doc
        for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)
        if (doc := yaml.safe_load(block)) and doc.get("kind") == "NetworkPolicy"
    ]
    pods = naming.attempt_labels("any-job", 1)
    spec = example["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pods.items()
    gang, metrics = spec["ingress"]
    assert gang["from"][0]["podSelector"]["matchLabels"].items() <= pods.items()
    assert "ports" not in gang  # rendezvous, then the collective backend's own ports
    assert metrics["ports"][0]["port"] == METRICS_PORT
    egress_ports = {p["port"] for rule in spec["egress"] for p in rule.get("ports", [])}
    assert {53, 443} <= egress_ports
