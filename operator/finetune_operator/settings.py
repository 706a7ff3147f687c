"""Operator configuration, read once from the environment at start-up.

Render functions take a `Settings` explicitly, so they stay pure and tests pass their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_api.version import version

# The trainer image of this release: the tag is the project's version (finetune_api.version).
# The chart's trainer.image defaults name the same image (tests/unit/test_settings_chart.py).
DEFAULT_TRAINER_REGISTRY = "ghcr.io"
DEFAULT_TRAINER_REPOSITORY = "finetune-operator/trainer"


def image_ref(registry: str, repository: str, tag: str) -> str:
    """[registry/]repository:tag, as the chart's finetune-operator.imageRef spells it."""
    return f"{registry}/{repository}:{tag}" if registry else f"{repository}:{tag}"


DEFAULT_TRAINER_IMAGE = image_ref(DEFAULT_TRAINER_REGISTRY, DEFAULT_TRAINER_REPOSITORY, version())
# spec.serve's GPU engines, when a job names no serve.image (the chart's serve.vllmImage and
# serve.tgiImage; tests/unit/test_settings_chart.py keeps them equal). TGI is in maintenance
# mode since December 2025; its last release line is 3.3.
DEFAULT_VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.33.0"
DEFAULT_TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.6"
# A pod of a restarting attempt still there this long after its grace period ended is reported
# stuck (reason PodStuckTerminating): far longer than a kubelet takes to confirm a stop, short
# enough to tell someone about a lost node within minutes.
STUCK_TERMINATING_SECONDS = 60.0
# How long after an attempt failed with CollectiveTimeout the verdict waits for a pod that has
# not reported its end to stop, or for its node to be marked not ready (a lost node: then the
# restart is a disruption). At least kube-controller-manager's --node-monitor-grace-period (50 s
# by default) plus its --node-monitor-period (5 s): the node went silent before the ranks that
# waited for it gave up.
NODE_LOST_WAIT_SECONDS = 60.0
# A FineTuneJob waiting on something it cannot watch (a Secret, a ResourceQuota, the garbage
# collection of a predecessor's child) is looked at again this often.
WAITING_SECONDS = 10.0


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _resources(value: str | None) -> dict[str, dict[str, str]]:
    """{"requests": {...}, "limits": {...}} from JSON (the chart's trainer.defaultResources).
    A malformed value stops the operator at start-up: silently ignoring it would leave every
    trainer pod without the requests the platform team asked for."""
    name = "FINETUNE_TRAINER_DEFAULT_RESOURCES"
    try:
        parsed: Any = json.loads(value) if value else {}
    except ValueError as exc:
        raise ValueError(f"{name} is not JSON: {exc}") from None
    if not isinstance(parsed, dict) or not set(parsed) <= {"requests", "limits"}:
        raise ValueError(f"{name} must be an object with only requests and limits")
    for key, quantities in parsed.items():
        if not isinstance(quantities, dict) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in quantities.values()
        ):
            raise ValueError(f"{name}: {key} must map resource names to quantities")
    return {key: {k: str(v) for k, v in q.items()} for key, q in parsed.items()}


@dataclass(frozen=True)
class Settings:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # Empty: cluster-wide. Otherwise the operator only watches these namespaces.
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8000
    liveness_endpoint: str = "http://0.0.0.0:8080/healthz"
    # A resync pass re-derives status even if a watch event was lost (kopf#1276, #955).
    resync_seconds: float = 60.0
    progress_seconds: float = 10.0
    scrape_timeout_seconds: float = 2.0
    stuck_terminating_seconds: float = STUCK_TERMINATING_SECONDS
    node_lost_wait_seconds: float = NODE_LOST_WAIT_SECONDS
    # Size of the /dev/shm emptyDir; torch DataLoader workers and NCCL need more than 64Mi.
    shm_size: str = "1Gi"
    log_level: str = "INFO"
    # Requests and limits for trainer containers of FineTuneJobs that set none themselves.
    trainer_default_resources: dict[str, dict[str, str]] = field(default_factory=dict)
    # Trainers keep serving metrics after training until one more scrape, at most this long, so
    # that a PodMonitor's scrape sees the final step and the after-training scores. 0: they exit
    # at once (the operator reads those from the result); the chart sets it with its PodMonitor.
    metrics_linger_seconds: int = 0
    # Images of spec.serve's vllm and tgi engines (transformers runs the trainer image).
    serve_vllm_image: str = DEFAULT_VLLM_IMAGE
    serve_tgi_image: str = DEFAULT_TGI_IMAGE
    # How long the smoke chat completion after a rollout may take (a CPU model generates slowly).
    serve_smoke_timeout_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            trainer_image=env.get("FINETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            image_pull_policy=env.get("FINETUNE_TRAINER_IMAGE_PULL_POLICY", "IfNotPresent"),
            namespaces=_csv(env.get("FINETUNE_WATCH_NAMESPACES")),
            metrics_port=int(env.get("FINETUNE_METRICS_PORT", "8000")),
            liveness_endpoint=env.get("FINETUNE_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"),
            resync_seconds=float(env.get("FINETUNE_RESYNC_SECONDS", "60")),
            progress_seconds=float(env.get("FINETUNE_PROGRESS_SECONDS", "10")),
            scrape_timeout_seconds=float(env.get("FINETUNE_SCRAPE_TIMEOUT_SECONDS", "2")),
            stuck_terminating_seconds=float(
                env.get("FINETUNE_STUCK_TERMINATING_SECONDS", STUCK_TERMINATING_SECONDS)
            ),
            node_lost_wait_seconds=float(
                env.get("FINETUNE_NODE_LOST_WAIT_SECONDS", NODE_LOST_WAIT_SECONDS)
            ),
            shm_size=env.get("FINETUNE_SHM_SIZE", "1Gi"),
            log_level=env.get("FINETUNE_LOG_LEVEL", "INFO").upper(),
            trainer_default_resources=_resources(env.get("FINETUNE_TRAINER_DEFAULT_RESOURCES")),
            metrics_linger_seconds=int(env.get("FINETUNE_METRICS_LINGER_SECONDS", "0")),
            serve_vllm_image=env.get("FINETUNE_SERVE_VLLM_IMAGE", DEFAULT_VLLM_IMAGE),
            serve_tgi_image=env.get("FINETUNE_SERVE_TGI_IMAGE", DEFAULT_TGI_IMAGE),
            serve_smoke_timeout_seconds=float(
                env.get("FINETUNE_SERVE_SMOKE_TIMEOUT_SECONDS", "60")
            ),
        )

    @classmethod
    def from_chart_values(cls, values: Mapping[str, Any], *, app_version: str) -> Settings:
        """The Settings the chart's operator runs with: the env that templates/deployment.yaml
        renders from `values` (the chart's values.yaml merged with the user's), read by
        from_env, so the two cannot drift apart without tests/unit/test_settings_chart.py
        noticing. `app_version` is Chart.yaml's appVersion, the default image tag.

        extraEnv entries with valueFrom are left out: only the cluster can resolve them.
        """
        trainer = values["trainer"]
        image = trainer["image"]
        # global.imageRegistry replaces each image's own registry (an umbrella chart's mirror).
        registry = (values.get("global") or {}).get("imageRegistry") or image.get("registry")
        env = {
            "FINETUNE_TRAINER_IMAGE": image_ref(
                registry or "", image["repository"], image.get("tag") or app_version
            ),
            "FINETUNE_TRAINER_IMAGE_PULL_POLICY": str(image["pullPolicy"]),
            "FINETUNE_WATCH_NAMESPACES": ",".join(values.get("watchNamespaces") or ()),
            "FINETUNE_METRICS_PORT": str(values["metrics"]["port"]),
            "FINETUNE_LIVENESS_ENDPOINT": f"http://0.0.0.0:{values['livenessProbe']['port']}/healthz",
            "FINETUNE_LOG_LEVEL": str(values["logLevel"]),
        }
        serve = values.get("serve") or {}
        if serve.get("vllmImage"):
            env["FINETUNE_SERVE_VLLM_IMAGE"] = str(serve["vllmImage"])
        if serve.get("tgiImage"):
            env["FINETUNE_SERVE_TGI_IMAGE"] = str(serve["tgiImage"])
        pod_monitor = (values.get("monitoring") or {}).get("podMonitor") or {}
        if pod_monitor.get("enabled"):
            linger = pod_monitor.get("finalScrapeSeconds", 20)
            env["FINETUNE_METRICS_LINGER_SECONDS"] = str(linger)
        if trainer.get("defaultResources"):  # the template's `with` skips an empty map
            env["FINETUNE_TRAINER_DEFAULT_RESOURCES"] = json.dumps(trainer["defaultResources"])
        # Appended after the chart's own entries; for a repeated name the kubelet keeps the last.
        for var in values.get("extraEnv") or ():
            if "valueFrom" not in var:
                env[var["name"]] = str(var.get("value", ""))
        return cls.from_env(env)
