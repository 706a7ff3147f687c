"""The chart's monitoring objects agree with what they monitor: the PodMonitor selects the pods
the operator renders, the ServiceMonitor the chart's metrics Service, the dashboard ConfigMap
carries the sidecar label and the very JSON file."""

from __future__ import annotations

import json

import pytest
from obs_helpers import (
    CHART,
    DASHBOARD_FILE,
    chart_values,
    helm_template,
    render_simple_template,
)

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


def _rendered_trainer_job() -> dict:
    from finetune_operator.api.validation import load_manifest
    from finetune_operator.render import render_manifests
    from finetune_operator.settings import Settings

    example = CHART.parents[1] / "trainer" / "finetune_trainer" / "examples"
    manifest = sorted(example.glob("*.yaml"))[0]
    docs = render_manifests(load_manifest(manifest), Settings())
    return next(d for d in docs if d["kind"] == "Job")


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_podmonitor_selects_the_rendered_trainer_pods(helm: str) -> None:
    monitor = _by_kind(helm_template(helm, MONITORING_ON, ["podmonitor.yaml"]))["PodMonitor"]
    from finetune_operator.api.constants import LABEL_ATTEMPT, TRAINER_METRICS_PORT

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
    assert ports.get(endpoint["port"]) == TRAINER_METRICS_PORT
    assert endpoint["interval"] == "7s"
    # The pod annotations for annotation-based discovery say the same.
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(TRAINER_METRICS_PORT)
    assert annotations["prometheus.io/path"] == endpoint["path"]
    # The attempt relabeling reads a label the pods carry.
    source = endpoint["relabelings"][0]["sourceLabels"][0]
    wanted = "__meta_kubernetes_pod_label_" + LABEL_ATTEMPT.replace(".", "_").replace("/", "_")
    assert source == wanted and LABEL_ATTEMPT in pod_labels
    assert monitor["metadata"]["labels"]["release"] == "prom"


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


@pytest.mark.parametrize("template", ["podmonitor.yaml", "servicemonitor.yaml"])
def test_the_stand_in_renderer_agrees_with_helm(helm: str, template: str) -> None:
    """The live test renders the monitors without helm when it has none; check it is faithful
    (apart from the labels it leaves out)."""
    values = chart_values()
    for key in ("podMonitor", "serviceMonitor"):
        values["monitoring"][key]["enabled"] = True
    ours = render_simple_template(template, values)
    theirs = helm_template(helm, values, [template])[0]
    assert ours is not None
    ours["metadata"].pop("labels", None)
    theirs["metadata"].pop("labels")
    ours["spec"]["selector"] = theirs["spec"]["selector"] = None  # helper labels: left out
    assert ours == theirs
