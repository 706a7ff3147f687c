"""The trainer pod of a FineTuneJob: env for rendezvous, resources, volumes, security. Pure.

Split from render.py so each stays readable; only `pod_spec` and `pod_metadata` are used outside
this module, and `quantities` and `threads_env`, which the serving pod's container shares.
"""

from __future__ import annotations

import math
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from finetune_api import pod
from finetune_api.v1alpha1 import FineTuneJob
from finetune_operator import naming
from finetune_operator.checkpoints import CheckpointStore
from finetune_operator.settings import Settings

Manifest = dict[str, Any]
TPU_ACCELERATOR_SELECTOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_SELECTOR = "cloud.google.com/gke-tpu-topology"
EPHEMERAL_STORAGE = "ephemeral-storage"
# Where Prometheus' annotation-based discovery finds rank 0's metrics.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(pod.METRICS_PORT),
    "prometheus.io/path": "/metrics",
}


def quantities(values: dict[str, int | str]) -> dict[str, str]:
    """A requests or limits map as a container takes it: names sorted, quantities as strings."""
    return {k: str(v) for k, v in sorted(values.items())}


def _resources(job: FineTuneJob, settings: Settings) -> Manifest:
    """The job's requests and limits, or the operator's defaults when it sets neither; the
    accelerator's extended resource on top."""
    res = job.spec.resources
    requests = quantities(res.requests)
    limits = quantities(res.limits)
    if not requests and not limits:
        requests = dict(settings.trainer_default_resources.get("requests", {}))
        limits = dict(settings.trainer_default_resources.get("limits", {}))
    if EPHEMERAL_STORAGE not in requests and EPHEMERAL_STORAGE not in limits:
        # The /tmp emptyDir (the HF cache) is sized by cacheSize: ask the scheduler for a node
        # with that much local storage, or the kubelet evicts the pod once the model is in.
        requests[EPHEMERAL_STORAGE] = job.spec.template.cache_size
        requests = dict(sorted(requests.items()))
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


def threads_env(resources: Manifest, processes: int, own_names: set[str]) -> dict[str, str]:
    """pod.THREADS_ENV for a container with these `resources` and torch `processes`: its CPU
    limit, else its CPU request, split over the processes and rounded down (more threads than
    the CPU quota are throttled), at least 1. Nothing where the container's own env (the job's
    template.env, `own_names`) sets it, without a CPU, or with a CPU the API server will refuse
    anyway. torchrun sets 1 where it starts several processes; this shares out what the pod has."""
    cpu = resources.get("limits", {}).get("cpu") or resources.get("requests", {}).get("cpu")
    if cpu is None or pod.THREADS_ENV in own_names:
        return {}
    try:
        cores = parse_quantity(cpu)
    except ValueError:
        return {}
    return {pod.THREADS_ENV: str(max(1, math.floor(cores / processes)))}


def _env(
    job: FineTuneJob, settings: Settings, store: CheckpointStore, resources: Manifest
) -> list[Manifest]:
    name, spec = job.metadata.name, job.spec
    own_names = {var.name for var in spec.template.env}
    rendezvous = pod.rendezvous_env(
        nnodes=spec.resources.nodes,
        nproc_per_node=spec.resources.processes_per_node,
        master_addr=naming.master_addr(name),
    )
    values = {
        **rendezvous,
        pod.CHECKPOINT_DIR_ENV: pod.CHECKPOINT_DIR,
        pod.RESULT_FILE_ENV: pod.RESULT_FILE,
        pod.JOB_NAME_ENV: name,
        pod.JOB_NAMESPACE_ENV: job.metadata.namespace,
        "HOME": pod.HOME_DIR,
        "HF_HOME": pod.HF_HOME,
        pod.METRICS_LINGER_ENV: str(settings.metrics_linger_seconds),
    }
    if store.hub_branch:
        values[pod.CHECKPOINT_HUB_BRANCH_ENV] = store.hub_branch
    if pod.preloads_allocator(spec.resources.accelerator.type, own_names):
        # The image's tcmalloc (pod.CPU_ALLOCATOR): the CPU step's large buffers are reused
        # instead of faulted in again each step. A template.env LD_PRELOAD is the user's choice.
        values[pod.PRELOAD_ENV] = pod.CPU_ALLOCATOR
    values.update(pod.cuda_allocator_env(spec.resources.accelerator.type, own_names))
    values.update(threads_env(resources, spec.resources.processes_per_node, own_names))
    if store.claim_name:
        # The model and data on the claim too, keyed by repo and commit: fetched once for the
        # job, then read by every pod and attempt (without a claim, rank 0 downloads once per
        # attempt and sends the files to the other pods: finetune_trainer.spread).
        values[pod.HF_HUB_CACHE_ENV] = pod.SOURCE_CACHE_DIR
    # The node rank is the pod's completion index, which only the pod knows.
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{naming.COMPLETION_INDEX}']"}}
    env: list[Manifest] = [
        {"name": pod.NODE_RANK, "valueFrom": index},
        *({"name": k, "value": v} for k, v in values.items()),
    ]
    env += _token_env(job)
    for var in spec.template.env:
        env.append(var.model_dump(mode="json", by_alias=True, exclude_none=True))
    return env


def _token_env(job: FineTuneJob) -> list[Manifest]:
    """The Hub tokens, each from its Secret key under the pod contract's name: the push token
    as HF_TOKEN, the model's and dataset's read tokens as their own variables, so that the
    trainer can hand each download and the push its own token."""
    return [
        {
            "name": token.env,
            "valueFrom": {"secretKeyRef": {"name": token.ref.name, "key": token.ref.key}},
        }
        for token in job.spec.token_secrets()
    ]


def _volumes(
    job: FineTuneJob, settings: Settings, store: CheckpointStore
) -> tuple[list[Manifest], list[Manifest]]:
    name, spec = job.metadata.name, job.spec
    checkpoints: Manifest = (
        {"persistentVolumeClaim": {"claimName": store.claim_name}}
        if store.claim_name
        else {"emptyDir": {}}
    )
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": naming.configmap_name(name)}},
        {"name": "checkpoints", **checkpoints},
        # NCCL and DataLoader workers use shared memory; the runtime default is 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": naming.CACHE_VOLUME, "emptyDir": {"sizeLimit": spec.template.cache_size}},
        *spec.template.volumes,
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": pod.CONFIG_DIR, "readOnly": True},
        {"name": "checkpoints", "mountPath": pod.CHECKPOINT_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": naming.CACHE_VOLUME, "mountPath": "/tmp"},
        *(
            m.model_dump(mode="json", by_alias=True, exclude_none=True)
            for m in spec.template.volume_mounts
        ),
    ]
    return volumes, mounts


def _container(
    job: FineTuneJob, settings: Settings, store: CheckpointStore, mounts: list[Manifest]
) -> Manifest:
    resources = _resources(job, settings)
    container: Manifest = {
        "name": pod.CONTAINER_NAME,
        "image": job.spec.template.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["finetune", "train", pod.CONFIG_PATH],
        "env": _env(job, settings, store, resources),
        # Every local rank serves its own metrics, so each gets a named port to scrape.
        "ports": [
            *(
                {
                    "name": pod.metrics_port_name(r),
                    "containerPort": pod.METRICS_PORT + r,
                    "protocol": "TCP",
                }
                for r in range(job.spec.resources.processes_per_node)
            ),
            {"name": "rendezvous", "containerPort": pod.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": mounts,
        # The result JSON is the termination message; a crash before it falls back to the log tail.
        "terminationMessagePath": pod.RESULT_FILE,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if resources:
        container["resources"] = resources
    return container


def pod_metadata(job: FineTuneJob, labels: dict[str, str]) -> Manifest:
    """The pod template's labels and annotations: template.labels and template.annotations with
    the operator's own on top. The schema refuses a template key of ours; should one get through
    anyway, ours still win, because the Service, status and scraping find the gang by them."""
    tpl = job.spec.template
    return {
        "labels": {**tpl.labels, **labels},
        "annotations": {**tpl.annotations, **SCRAPE_ANNOTATIONS},
    }


def _security_context(job: FineTuneJob) -> Manifest:
    """Non-root always, but no fixed UID: the image's USER is numeric (1000), and a platform
    such as OpenShift (restricted-v2) assigns its own UID and fsGroup and refuses any other."""
    context: Manifest = {"runAsNonRoot": True}
    own = job.spec.template.security_context
    if own is not None:
        context.update(own.model_dump(mode="json", by_alias=True, exclude_none=True))
    context["seccompProfile"] = {"type": "RuntimeDefault"}
    return context


def _topology_spread(job: FineTuneJob) -> list[Manifest]:
    """The constraints as Kubernetes spells them; one without labelSelector counts the gang's
    own pods, which is what spreading a gang means (Kubernetes' default would count none)."""
    out: list[Manifest] = []
    for constraint in job.spec.template.topology_spread_constraints:
        # exclude_defaults drops the unset lists and maps but keeps an explicit `{}` selector.
        rendered = constraint.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if constraint.label_selector is None:
            rendered["labelSelector"] = {"matchLabels": naming.selector_labels(job.metadata.name)}
        out.append(rendered)
    return out


def pod_spec(job: FineTuneJob, settings: Settings, store: CheckpointStore) -> Manifest:
    name, spec = job.metadata.name, job.spec
    tpl = spec.template
    volumes, mounts = _volumes(job, settings, store)
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
        # The trainer never calls the API server: no token for a compromised rank to use.
        "automountServiceAccountToken": False,
        "securityContext": _security_context(job),
        "containers": [_container(job, settings, store, mounts)],
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
    if tpl.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in tpl.image_pull_secrets]
    if tpl.scheduler_name:
        pod["schedulerName"] = tpl.scheduler_name
    if tpl.runtime_class_name:
        pod["runtimeClassName"] = tpl.runtime_class_name
    if tpl.termination_grace_period_seconds is not None:
        pod["terminationGracePeriodSeconds"] = tpl.termination_grace_period_seconds
    if tpl.topology_spread_constraints:
        pod["topologySpreadConstraints"] = _topology_spread(job)
    return pod
