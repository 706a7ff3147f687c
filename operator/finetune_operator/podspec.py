"""The trainer pod of a FineTuneJob: env for rendezvous, resources, volumes, security. Pure.

Split from render.py so each stays readable; only `pod_spec` is used outside this module.
"""

from __future__ import annotations

from typing import Any

from finetune_operator import naming
from finetune_operator.api.constants import (
    DEFAULT_RESULT_FILE,
    RENDEZVOUS_PORT,
    TRAINER_METRICS_PORT,
)
from finetune_operator.api.v1alpha1 import FineTuneJob
from finetune_operator.settings import Settings

Manifest = dict[str, Any]
TPU_ACCELERATOR_SELECTOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_SELECTOR = "cloud.google.com/gke-tpu-topology"
HF_HOME = "/tmp/hf"


def _quantities(values: dict[str, int | str]) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(values.items())}


def _resources(job: FineTuneJob, settings: Settings) -> Manifest:
    """The job's requests and limits, or the operator's defaults when it sets neither; the
    accelerator's extended resource on top."""
    res = job.spec.resources
    requests = _quantities(res.requests)
    limits = _quantities(res.limits)
    if not requests and not limits:
        requests = dict(settings.trainer_default_resources.get("requests", {}))
        limits = dict(settings.trainer_default_resources.get("limits", {}))
    acc = res.accelerator
    if acc.type != "cpu":
        # Extended resources cannot be overcommitted: requests must equal limits.
        requests[acc.type] = limits[acc.type] = str(acc.count)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _env(job: FineTuneJob, settings: Settings) -> list[Manifest]:
    name, spec = job.metadata.name, job.spec
    env: list[Manifest] = [
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{naming.COMPLETION_INDEX}']"}
            },
        },
        {"name": "NNODES", "value": str(spec.resources.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(spec.resources.processes_per_node)},
        {"name": "MASTER_ADDR", "value": naming.master_addr(name)},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "FINETUNE_CHECKPOINT_DIR", "value": naming.CHECKPOINT_DIR},
        {"name": "FINETUNE_RESULT_FILE", "value": DEFAULT_RESULT_FILE},
        # The trainer takes both from the manifest; these are for code and shells in the pod.
        {"name": "FINETUNE_JOB_NAME", "value": name},
        {"name": "FINETUNE_JOB_NAMESPACE", "value": job.metadata.namespace},
        # The root filesystem is read-only: caches and home go to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "FINETUNE_METRICS_LINGER_SECONDS", "value": str(settings.metrics_linger_seconds)},
    ]
    hub = spec.output.hub
    if hub is not None and hub.token_secret_ref is not None:
        ref = hub.token_secret_ref
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    for var in spec.template.env:
        env.append(var.model_dump(mode="json", by_alias=True, exclude_none=True))
    return env


def _volumes(job: FineTuneJob, settings: Settings) -> tuple[list[Manifest], list[Manifest]]:
    name, spec = job.metadata.name, job.spec
    ckpt = spec.output.checkpoints
    if ckpt is not None and ckpt.persistent_volume_claim is not None:
        checkpoints: Manifest = {
            "persistentVolumeClaim": {"claimName": ckpt.persistent_volume_claim.claim_name}
        }
    else:
        checkpoints = {"emptyDir": {}}
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": naming.configmap_name(name)}},
        {"name": "checkpoints", **checkpoints},
        # NCCL and DataLoader workers use shared memory; the runtime default is 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": "tmp", "emptyDir": {}},
        *spec.template.volumes,
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": naming.CONFIG_DIR, "readOnly": True},
        {"name": "checkpoints", "mountPath": naming.CHECKPOINT_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        *(
            m.model_dump(mode="json", by_alias=True, exclude_none=True)
            for m in spec.template.volume_mounts
        ),
    ]
    return volumes, mounts


def _container(job: FineTuneJob, settings: Settings, mounts: list[Manifest]) -> Manifest:
    container: Manifest = {
        "name": naming.CONTAINER_NAME,
        "image": job.spec.template.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["finetune", "train", naming.CONFIG_PATH],
        "env": _env(job, settings),
        # Every local rank serves its own metrics, so each gets a named port to scrape.
        "ports": [
            *(
                {
                    "name": naming.metrics_port_name(r),
                    "containerPort": TRAINER_METRICS_PORT + r,
                    "protocol": "TCP",
                }
                for r in range(job.spec.resources.processes_per_node)
            ),
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": mounts,
        # The result JSON is the termination message; a crash before it falls back to the log tail.
        "terminationMessagePath": DEFAULT_RESULT_FILE,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    resources = _resources(job, settings)
    if resources:
        container["resources"] = resources
    return container


def pod_spec(job: FineTuneJob, settings: Settings) -> Manifest:
    name, spec = job.metadata.name, job.spec
    tpl = spec.template
    volumes, mounts = _volumes(job, settings)
    node_selector = dict(tpl.node_selector)
    tpu = spec.resources.accelerator.tpu
    if tpu is not None:
        node_selector[TPU_ACCELERATOR_SELECTOR] = tpu.accelerator
        node_selector[TPU_TOPOLOGY_SELECTOR] = tpu.topology
    pod: Manifest = {
        "restartPolicy": "Never",
        "subdomain": naming.service_name(name),
        # A Service named e.g. "master" would inject MASTER_PORT=tcp://... into every pod.
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, settings, mounts)],
        "volumes": volumes,
    }
    if node_selector:
        pod["nodeSelector"] = dict(sorted(node_selector.items()))
    if tpl.tolerations:
        pod["tolerations"] = list(tpl.tolerations)
    if tpl.affinity:
        pod["affinity"] = tpl.affinity
    if tpl.priority_class_name:
        pod["priorityClassName"] = tpl.priority_class_name
    if tpl.service_account_name:
        pod["serviceAccountName"] = tpl.service_account_name
    return pod
