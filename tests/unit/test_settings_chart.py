"""`Settings.from_chart_values` against the chart itself: helm renders the Deployment, and the
operator's Settings read from that Deployment's env must equal those computed from the values
(what `finetune render --values` uses). A template change the mirror misses fails here.

    python -m pytest tests/unit/test_settings_chart.py     # helm from hack/helm.sh, as test_chart
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart import CHART, Helm, operator_container, template
from test_chart import helm as helm  # the session fixture: hack/helm.sh, no cluster

from finetune_cli.render import chart_values, merge_values
from finetune_operator.settings import (
    DEFAULT_TRAINER_IMAGE,
    DEFAULT_TRAINER_REGISTRY,
    DEFAULT_TRAINER_REPOSITORY,
    Settings,
)

OVERRIDE: dict[str, Any] = {
    "trainer": {
        "image": {
            "registry": "registry.example",
            "repository": "trainer",
            "tag": "1.2.3",
            "pullPolicy": "Always",
        },
        "defaultResources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": 8}},
    },
    "watchNamespaces": ["team-a", "team-b"],
    "logLevel": "debug",
    "metrics": {"port": 9100},
    "livenessProbe": {"port": 8181},
    "extraEnv": [
        {"name": "FINETUNE_RESYNC_SECONDS", "value": "30"},
        # Repeats one the chart sets: the kubelet keeps the last, and so must the mirror.
        {"name": "FINETUNE_LOG_LEVEL", "value": "warning"},
        # Resolved only in the cluster: both sides leave it out.
        {"name": "FINETUNE_SHM_SIZE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
}
# A later file's null deletes the key, as in helm: the default resources are gone again.
UNSET = {"trainer": {"defaultResources": None, "image": {"tag": None}}}
# An umbrella chart's mirror for every image: it replaces the per-image registry.
MIRROR = {"global": {"imageRegistry": "mirror.example:5000/ml", "other": "ignored"}}
# Images built locally (kind): no registry at all.
LOCAL = {"trainer": {"image": {"registry": "", "repository": "finetune-trainer"}}}
VALUE_FILES: dict[str, list[dict[str, Any]]] = {
    "defaults": [],
    "override": [OVERRIDE],
    "override-then-unset": [OVERRIDE, UNSET],
    "global-registry": [OVERRIDE, MIRROR],
    "no-registry": [LOCAL],
}


def deployment_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator container's env as the kubelet gives it: later names win, and valueFrom
    entries (unknowable here) are left out."""
    env: dict[str, str] = {}
    for var in operator_container(docs)["env"]:
        if "valueFrom" not in var:
            env[var["name"]] = var.get("value", "")
    return env


@pytest.mark.parametrize("files", VALUE_FILES.values(), ids=VALUE_FILES.keys())
def test_settings_from_values_match_the_rendered_deployment(
    helm: Helm, files: list[dict[str, Any]], tmp_path: Path
) -> None:
    paths = []
    for i, values in enumerate(files):
        paths.append(tmp_path / f"values-{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(values))
    docs = template(helm, *(arg for p in paths for arg in ("-f", str(p))))
    values, app_version = chart_values(CHART, paths)
    assert Settings.from_env(deployment_env(docs)) == Settings.from_chart_values(
        values, app_version=app_version
    )


def test_the_override_reaches_the_settings() -> None:
    """The equality above could hold with both sides ignoring the values; this pins them."""
    defaults = settings_for([])
    assert defaults.trainer_image == "ghcr.io/finetune-operator/trainer:0.1.0"
    assert defaults.image_pull_policy == "IfNotPresent"
    assert defaults.trainer_default_resources == {}
    settings = settings_for([OVERRIDE])
    assert settings.trainer_image == "registry.example/trainer:1.2.3"
    assert settings.image_pull_policy == "Always"
    assert settings.trainer_default_resources == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "8"},
    }
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.metrics_port == 9100
    assert settings.liveness_endpoint == "http://0.0.0.0:8181/healthz"
    assert settings.resync_seconds == 30 and settings.log_level == "WARNING"
    unset = settings_for([OVERRIDE, UNSET])
    assert unset.trainer_image == "registry.example/trainer:0.1.0"
    assert unset.trainer_default_resources == {}
    assert settings_for([OVERRIDE, MIRROR]).trainer_image == "mirror.example:5000/ml/trainer:1.2.3"
    assert settings_for([LOCAL]).trainer_image == "finetune-trainer:0.1.0"


def test_the_chart_default_trainer_image_is_the_operators() -> None:
    """The operator without FINETUNE_TRAINER_IMAGE (run outside the chart) and the chart's
    defaults name one image: a drift between values.yaml and settings.py fails here."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    image = values["trainer"]["image"]
    assert (image["registry"], image["repository"]) == (
        DEFAULT_TRAINER_REGISTRY,
        DEFAULT_TRAINER_REPOSITORY,
    )
    assert not values["global"]["imageRegistry"] and not image["tag"]  # the appVersion
    assert (
        settings_for([]).trainer_image
        == DEFAULT_TRAINER_IMAGE
        == Settings.from_env({}).trainer_image
    )


def settings_for(files: list[dict[str, Any]]) -> Settings:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for override in files:
        values = merge_values(values, override)
    return Settings.from_chart_values(values, app_version=str(chart["appVersion"]))
