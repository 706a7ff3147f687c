"""The chart's monitoring objects agree with what they monitor: the PodMonitor selects the pods
the operator renders, the ServiceMonitor the chart's metrics Service, the dashboard ConfigMap
carries the sidecar label and the very JSON file."""

from __future__ import annotations

import json

import pytest
from obs_helpers import (
    CHART,
    DASHBOARD_FILE,
    helm_template,
)

from finetune_api.constants import LABEL_ATTEMPT
from finetune_api.pod import METRICS_PORT

pytestmark = pytest.mark.observability

MONITORING_ON = {
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True, "interval": "7s", "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True},
        "dashboards": {
            "enabled": True,
            "label": "grafana_dashboard",
            "labelValue": "yes",
            "namespace": "grafana",
        },
    }
}


def _rendered_trainer_job(processes_per_node: int = 1) -> dict:
    from finetune_api.validation import load_manifest
    from finetune_operator.render import render_manifests
    from finetune_operator.settings import Settings

    example = CHART.parents[1] / "trainer" / "finetune_trainer" / "examples"
    job = load_manifest(sorted(example.glob("*.yaml"))[0])
    job.spec.resources.processes_per_node = processes_per_node
    docs = render_manifests(job, Settings())
    return next(d for d in docs if d["kind"] == "Job")


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_podmonitor_selects_the_rendered_trainer_pods(helm: str) -> None:
    monitor = _by_kind(helm_template(helm, MONITORING_ON, ["podmonitor.yaml"]))["PodMonitor"]

    template = _rendered_trainer_job()["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert pod_labels.get(key) == value, (key, value, pod_labels)
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    ports = {
        p["name"]: p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
    }
    assert ports.get(endpoint["port"]) == METRICS_PORT
    assert endpoint["interval"] == "7s"
    # The pod annotations for annotation-based discovery say the same.
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == endpoint["path"]
    # The attempt relabeling reads a label the pods carry.
    source = endpoint["relabelings"][0]["sourceLabels"][0]
    wanted = "__meta_kubernetes_pod_label_" + LABEL_ATTEMPT.replace(".", "_").replace("/", "_")
    assert source == wanted and LABEL_ATTEMPT in pod_labels
    assert monitor["metadata"]["labels"]["release"] == "prom"


@pytest.mark.parametrize("ranks", [1, 4, 8])
def test_podmonitor_scrapes_every_local_rank(helm: str, ranks: int) -> None:
    """Each local rank serves metrics on METRICS_PORT + local rank; the PodMonitor has
    an endpoint for every such port of a pod with up to `processesPerNode` (default 8) ranks."""
    monitor = _by_kind(helm_template(helm, MONITORING_ON, ["podmonitor.yaml"]))["PodMonitor"]
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert len(endpoints) == 8
    assert all(e["relabelings"] == endpoints[0]["relabelings"] for e in endpoints)
    template = _rendered_trainer_job(ranks)["spec"]["template"]
    metrics_ports = {
        p["name"]: p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c["ports"]
        if p["name"] != "rendezvous"
    }
    assert sorted(metrics_ports.values()) == [METRICS_PORT + r for r in range(ranks)]
    assert set(metrics_ports) <= {e["port"] for e in endpoints}


def test_podmonitor_endpoints_follow_processes_per_node(helm: str) -> None:
    values = json.loads(json.dumps(MONITORING_ON))
    values["monitoring"]["podMonitor"]["processesPerNode"] = 3
    monitor = _by_kind(helm_template(helm, values, ["podmonitor.yaml"]))["PodMonitor"]
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics", "metrics-1", "metrics-2"]


def test_servicemonitor_selects_the_metrics_service(helm: str) -> None:
    docs = helm_template(helm, MONITORING_ON, ["servicemonitor.yaml", "service.yaml"])
    monitor = _by_kind(docs)["ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [
        s
        for s in services
        if all(
            s["metadata"]["labels"].get(k) == v
            for k, v in monitor["spec"]["selector"]["matchLabels"].items()
        )
    ]
    assert len(selected) == 1, selected
    service = selected[0]
    assert service["metadata"]["name"] == "obs-finetune-operator-metrics"
    port = monitor["spec"]["endpoints"][0]["port"]
    assert port in [p["name"] for p in service["spec"]["ports"]]
    namespace = service["metadata"]["namespace"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}


def test_dashboard_configmap_carries_the_sidecar_label_and_the_file(helm: str) -> None:
    config_map = _by_kind(helm_template(helm, MONITORING_ON, ["dashboards-configmap.yaml"]))[
        "ConfigMap"
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "yes"
    assert config_map["metadata"]["namespace"] == "grafana"
    ((name, text),) = config_map["data"].items()
    assert name == "finetune-operator.json"
    assert json.loads(text) == json.loads(DASHBOARD_FILE.read_text())


def test_defaults_render_no_prometheus_operator_objects(helm: str) -> None:
    kinds = {d["kind"] for d in helm_template(helm, {}, [])}
    assert not kinds & {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert "ConfigMap" in kinds  # dashboards are on by default: they need no CRD
