"""Pure renderers: a FineTuneJob in, Kubernetes manifests (plain dicts) out.

No kopf, no client, no clock: the same input always gives the same output, so golden files can
pin every byte. The owner reference is passed in explicitly rather than taken from kopf's context.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune_api import pod
from finetune_api.constants import API_VERSION, KIND, LABEL_KUEUE_QUEUE
from finetune_api.v1alpha1 import MUTABLE_RUN_POLICY_FIELDS, FineTuneJob
from finetune_operator import naming, serve
from finetune_operator.checkpoints import CheckpointStore, choose
from finetune_operator.podspec import pod_metadata, pod_spec
from finetune_operator.settings import Settings

Manifest = dict[str, Any]
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
# What `finetune render` shows for the revision a job has yet to push.
PLACEHOLDER_REVISION = "0000000000000000000000000000000000000000"


def owner_reference(name: str, uid: str) -> Manifest:
    """A controller owner reference to a FineTuneJob, so deleting it garbage-collects children."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, owner: Manifest, labels: dict[str, str]) -> Manifest:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels,
        "ownerReferences": [owner],
    }


def trainer_manifest(job: FineTuneJob) -> Manifest:
    """The document the trainer reads: identity and the spec fixed at creation only.

    Status is the operator's business, and template.env is dropped because it may carry values
    the user meant only for the container; the env reaches the pod through the pod spec anyway.
    The fields that may change while the job runs (serve, runPolicy's MUTABLE_RUN_POLICY_FIELDS)
    steer the operator and are left out: an edit to them (a suspend, a new deadline) must not
    rewrite the ConfigMap, whose volume the kubelet swaps under the running pods.
    """
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec.get("template", {}).pop("env", None)
    spec.pop("serve", None)
    for field in MUTABLE_RUN_POLICY_FIELDS:
        spec.get("runPolicy", {}).pop(field, None)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        "spec": spec,
    }


def render_configmap(job: FineTuneJob, owner: Manifest) -> Manifest:
    name = job.metadata.name
    text = yaml.safe_dump(trainer_manifest(job), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, naming.configmap_name(name), owner, naming.child_labels(name)),
        "data": {pod.CONFIG_KEY: text},
    }


def render_service(job: FineTuneJob, owner: Manifest) -> Manifest:
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, naming.service_name(name), owner, naming.child_labels(name)),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve rank 0 before any pod is Ready: rendezvous is what makes it ready.
            "publishNotReadyAddresses": True,
            "selector": naming.selector_labels(name),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": pod.RENDEZVOUS_PORT,
                    "targetPort": pod.RENDEZVOUS_PORT,
                },
                {"name": "metrics", "port": pod.METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


def render_rendezvous_service(job: FineTuneJob, owner: Manifest) -> Manifest:
    """MASTER_ADDR: one virtual IP for the pod of completion index 0, whichever pod that is
    (see naming). Not-ready addresses too, as for the headless Service: the rendezvous is what
    makes the ranks ready."""
    name = job.metadata.name
    meta = _metadata(job, naming.rendezvous_service_name(name), owner, naming.child_labels(name))
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "publishNotReadyAddresses": True,
            "selector": {**naming.selector_labels(name), naming.COMPLETION_INDEX: "0"},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": pod.RENDEZVOUS_PORT,
                    "targetPort": pod.RENDEZVOUS_PORT,
                }
            ],
        },
    }


def render_checkpoint_claim(job: FineTuneJob, owner: Manifest) -> Manifest:
    """The ReadWriteOnce claim for a one-node gang's checkpoints (checkpoints.choose decides
    when). Owned by the FineTuneJob, so it goes when the job goes, not when an attempt does."""
    name, ckpt = job.metadata.name, job.spec.output.checkpoints
    spec: Manifest = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(ckpt.size)}},
    }
    if ckpt.storage_class_name:
        spec["storageClassName"] = ckpt.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(
            job, naming.checkpoint_claim_name(name), owner, naming.child_labels(name)
        ),
        "spec": spec,
    }


def render_job(
    job: FineTuneJob, owner: Manifest, attempt: int, settings: Settings, store: CheckpointStore
) -> Manifest:
    """The Indexed Job of one attempt: one pod per node, and the whole gang fails together."""
    name, spec = job.metadata.name, job.spec
    policy = spec.run_policy
    nodes = spec.resources.nodes
    labels = naming.attempt_labels(name, attempt)
    job_labels = dict(labels)
    if policy.queue_name:
        job_labels[LABEL_KUEUE_QUEUE] = policy.queue_name
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        # A crash fails the attempt: no per-pod retries, the operator restarts the whole gang
        # (from its checkpoint) as a new attempt. A pod that was stopped (evicted, preempted,
        # deleted: it got SIGTERM, and the gang saved a checkpoint) is replaced by the Job
        # controller instead, and the rest of the gang rejoins it in place (ExitCode.REJOIN).
        "backoffLimit": 0,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": pod.CONTAINER_NAME,
                        "operator": "In",
                        "values": [int(c) for c in pod.PERMANENT_EXIT_CODES],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": pod.CONTAINER_NAME,
                        "operator": "In",
                        "values": [int(c) for c in pod.REPLACED_EXIT_CODES],
                    },
                },
            ]
        },
        # Kueue admits a queued Job by unsuspending it, so it must be born suspended.
        "suspend": bool(policy.suspend or policy.queue_name),
        "template": {
            "metadata": pod_metadata(job, labels),
            "spec": pod_spec(job, settings, store),
        },
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, naming.batch_job_name(name), owner, job_labels),
        "spec": job_spec,
    }


def render_manifests(job: FineTuneJob, settings: Settings) -> list[Manifest]:
    """Every child of a FineTuneJob's first attempt, for `finetune render` (placeholder owner),
    on a cluster with a default StorageClass; with spec.serve, then the serving Deployment and
    Service as they will be once the job Succeeded (a placeholder for the pushed revision)."""
    owner = owner_reference(job.metadata.name, job.metadata.uid or PLACEHOLDER_UID)
    store = choose(job, default_storage_class=True)
    claim = [render_checkpoint_claim(job, owner)] if store.owned_claim else []
    served: list[Manifest] = []
    if job.spec.serve is not None:
        artifact = expected_artifact(job)
        served = [
            serve.render_serve_deployment(job, owner, settings, PLACEHOLDER_REVISION, artifact),
            serve.render_serve_service(job, owner),
        ]
    return [
        render_configmap(job, owner),
        render_service(job, owner),
        render_rendezvous_service(job, owner),
        *claim,
        render_job(job, owner, attempt=1, settings=settings, store=store),
        *served,
    ]


def expected_artifact(job: FineTuneJob) -> str:
    """What the push will be (the trainer's modeling.artifact_kind, which the operator may not
    import): full weights without PEFT, merged ones with output.hub.merge, else the adapter."""
    if job.spec.peft.method == "none":
        return "full"
    hub = job.spec.output.hub
    return "merged" if hub is not None and hub.merge else "adapter"
