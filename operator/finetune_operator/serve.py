"""Pure renderers of what spec.serve serves: a Deployment and a Service per FineTuneJob.

The Deployment serves exactly one pushed revision (`status.result.revision`): its init
container, the trainer image's `finetune serve-prepare`, downloads that commit of the output repo
into an emptyDir, at `<SERVE_ROOT>/<repo id>`. For the transformers engine it merges an adapter
onto its base there, since `transformers serve` loads one model; vLLM and TGI load the base
themselves and apply the adapter beside it (vLLM: --enable-lora --lora-modules; TGI:
LORA_ADAPTERS, requests name it with adapter_id). Clients send the repo id as `model` everywhere.

Rollouts are the Deployment's own: a new revision or a changed spec.serve changes the pod
template, and the rolling update (maxUnavailable 0) keeps the old pods serving until new ones
pass their readiness probe. A rollout that never gets there (a bad image, a model that does not
load) therefore leaves the previous pods serving; status (serve_status.py) says so.

The Hub token reaches the init container from the job's own Secret (secretKeyRef), never an
argument. Nothing here talks to the cluster.
"""

from __future__ import annotations

from typing import Any

from finetune_api import pod
from finetune_api.v1alpha1 import FineTuneJob, SecretKeyRef, ServeSpec
from finetune_operator import naming
from finetune_operator.podspec import quantities, threads_env
from finetune_operator.settings import Settings

Manifest = dict[str, Any]
# A rollout that has not finished by then is failed (Progressing=False,
# ProgressDeadlineExceeded); the previous pods keep serving.
PROGRESS_DEADLINE_SECONDS = 600
# vLLM sizes its LoRA slots by --max-lora-rank, and accepts only these values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
GPU = "nvidia.com/gpu"


def served_model(job: FineTuneJob) -> str:
    """The name clients send as `model`: the output repo id (serve needs output.hub)."""
    hub = job.spec.output.hub
    if hub is None:  # the schema refuses serve without it
        raise ValueError("spec.serve needs spec.output.hub")
    return hub.repo


def serve_url(job: FineTuneJob) -> str:
    """The OpenAI-compatible base URL inside the cluster."""
    name, ns = naming.serve_name(job.metadata.name), job.metadata.namespace
    return f"http://{name}.{ns}.svc:{pod.SERVE_PORT}{pod.SERVE_API_PATH}"


def _metadata(job: FineTuneJob, owner: Manifest) -> Manifest:
    name = job.metadata.name
    return {
        "name": naming.serve_name(name),
        "namespace": job.metadata.namespace,
        "labels": naming.serve_labels(name),
        "ownerReferences": [owner],
    }


def _model_path(job: FineTuneJob) -> str:
    return f"{pod.SERVE_ROOT}/{served_model(job)}"


def _base(job: FineTuneJob) -> tuple[str, str | None]:
    """The base model as an engine names it (a Hub id, or a path in a mounted volume) and its
    revision (only for a Hub id)."""
    source = job.spec.model.source
    if source.startswith("hf://"):
        return source.removeprefix("hf://"), job.spec.model.revision
    return source.removeprefix("file://"), None


def _merged(job: FineTuneJob, artifact: str) -> bool:
    """Whether the server loads one model folder (the transformers engine always merges)."""
    engine = job.spec.serve.engine if job.spec.serve else "transformers"
    return artifact != "adapter" or engine == "transformers"


def _secret_env(name: str, ref: SecretKeyRef) -> Manifest:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _hub_env(job: FineTuneJob, *, engine: bool = False) -> list[Manifest]:
    """Where the Hub is and the token that reads it, from the job's own Secrets; then the
    user's template.env (e.g. HF_HUB_DISABLE_XET for a plain-LFS Hub).

    The prepare step reads the output repo with the push token (HF_TOKEN) and a base to merge
    with the model's read token (FINETUNE_MODEL_TOKEN), as the trainer does. An `engine` (vLLM,
    TGI) downloads only the base, and knows only HF_TOKEN: it gets the model's read token under
    that name when the job has one."""
    hub, model = job.spec.output.hub, job.spec.model
    env: list[Manifest] = [
        {"name": "HOME", "value": pod.HOME_DIR},
        {"name": "HF_HOME", "value": pod.HF_HOME},
    ]
    if hub is not None and hub.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hub.endpoint.rstrip("/")})
    push = hub.token_secret_ref if hub is not None else None
    if engine:
        read = model.token_secret_ref or push
        env += [_secret_env(pod.HF_TOKEN_ENV, read)] if read is not None else []
    else:
        env += [_secret_env(pod.HF_TOKEN_ENV, push)] if push is not None else []
        if model.token_secret_ref is not None:
            env.append(_secret_env(pod.MODEL_TOKEN_ENV, model.token_secret_ref))
    env += [
        var.model_dump(mode="json", by_alias=True, exclude_none=True)
        for var in job.spec.template.env
    ]
    return env


def _prepare_container(
    job: FineTuneJob, settings: Settings, revision: str, artifact: str, mounts: list[Manifest]
) -> Manifest:
    _, base_revision = _base(job)
    command = [
        "finetune",
        "serve-prepare",
        "--repo",
        served_model(job),
        "--revision",
        revision,
        "--out",
        _model_path(job),
    ]
    if _merged(job, artifact):
        command += ["--base", job.spec.model.source]
        if base_revision:
            command += ["--base-revision", base_revision]
    else:
        command.append("--no-merge")
    return {
        "name": pod.SERVE_PREPARE_CONTAINER_NAME,
        "image": job.spec.template.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": _hub_env(job),
        "volumeMounts": [dict(m) for m in mounts],
        "securityContext": _restricted(),
    }


def _restricted() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def _vllm_lora_rank(r: int) -> int:
    return next((v for v in VLLM_LORA_RANKS if v >= r), VLLM_LORA_RANKS[-1])


def _gpus(serve: ServeSpec) -> int:
    """The GPUs of the serving container: its nvidia.com/gpu limit (or request: for an extended
    resource they are equal), else 1."""
    amount = str(serve.resources.limits.get(GPU, serve.resources.requests.get(GPU, 1)))
    return int(amount) if amount.isdigit() else 1


def _server(job: FineTuneJob, settings: Settings, artifact: str) -> Manifest:
    """The engine's container: its image, command or env, and its probe."""
    serve = job.spec.serve
    assert serve is not None
    model, path = served_model(job), _model_path(job)
    base, base_revision = _base(job)
    port = {"name": pod.SERVE_PORT_NAME, "containerPort": pod.SERVE_PORT, "protocol": "TCP"}
    container: Manifest = {"name": pod.SERVE_CONTAINER_NAME}
    resources: Manifest = {}
    if serve.resources.requests:
        resources["requests"] = quantities(serve.resources.requests)
    if serve.resources.limits:
        resources["limits"] = quantities(serve.resources.limits)
    env: list[Manifest] = []
    if serve.engine == "transformers":
        container["image"] = serve.image or job.spec.template.image or settings.trainer_image
        # Run from the model root: `transformers serve <repo id>` then loads the local folder
        # (from_pretrained tries a path first), and requests name the model by the repo id.
        container["workingDir"] = pod.SERVE_ROOT
        container["command"] = ["transformers", "serve", model]
        container["args"] = ["--host", "0.0.0.0", "--port", str(pod.SERVE_PORT)]
        # Everything is local by now: the server must never reach for the Hub.
        env = [
            {"name": "HOME", "value": pod.HOME_DIR},
            {"name": "HF_HOME", "value": pod.HF_HOME},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
        ]
        # One torch process, whose thread pool fits the server's CPU as a trainer rank's does
        # (the other engines' images start processes of their own, and size them themselves).
        own_names = {var.name for var in job.spec.template.env}
        env += [{"name": k, "value": v} for k, v in threads_env(resources, 1, own_names).items()]
        env += [
            var.model_dump(mode="json", by_alias=True, exclude_none=True)
            for var in job.spec.template.env
        ]
        container["securityContext"] = _restricted()
    elif serve.engine == "vllm":
        container["image"] = serve.image or settings.serve_vllm_image
        args = ["--host", "0.0.0.0", "--port", str(pod.SERVE_PORT)]
        if _merged(job, artifact):
            command = ["vllm", "serve", path]
            args += ["--served-model-name", model]
        else:
            command = ["vllm", "serve", base]
            if base_revision:
                args += ["--revision", base_revision]
            args += [
                "--enable-lora",
                "--lora-modules",
                f"{model}={path}",
                "--max-lora-rank",
                str(_vllm_lora_rank(job.spec.peft.r)),
            ]
        if (gpus := _gpus(serve)) > 1:
            # One model over all of the container's GPUs, not one GPU used and the rest idle.
            args += ["--tensor-parallel-size", str(gpus)]
        container["command"], container["args"] = command, args
        env = _hub_env(job, engine=True)
    else:  # tgi
        container["image"] = serve.image or settings.serve_tgi_image
        values = {"PORT": str(pod.SERVE_PORT), "HOSTNAME": "0.0.0.0"}
        if _merged(job, artifact):
            values["MODEL_ID"] = path
        else:
            values["MODEL_ID"] = base
            if base_revision:
                values["REVISION"] = base_revision
            # Requests pick the adapter with adapter_id (the chat route: `model`).
            values["LORA_ADAPTERS"] = f"{model}={path}"
        if (gpus := _gpus(serve)) > 1:
            values["NUM_SHARD"] = str(gpus)  # tensor parallel, as vLLM's above
        env = [{"name": k, "value": v} for k, v in values.items()] + _hub_env(job, engine=True)
    container.update(
        {
            "imagePullPolicy": settings.image_pull_policy,
            "env": env,
            "ports": [port],
            # Ready only once the model is loaded: every engine answers /health after that,
            # and the rolling update waits for it before it retires an old pod.
            "readinessProbe": {
                "httpGet": {"path": pod.SERVE_HEALTH_PATH, "port": pod.SERVE_PORT_NAME},
                "periodSeconds": 5,
                "failureThreshold": 3,
            },
            "startupProbe": {
                "httpGet": {"path": pod.SERVE_HEALTH_PATH, "port": pod.SERVE_PORT_NAME},
                "periodSeconds": 5,
                "failureThreshold": PROGRESS_DEADLINE_SECONDS // 5,
            },
        }
    )
    if resources:
        container["resources"] = resources
    return container


def render_serve_deployment(
    job: FineTuneJob, owner: Manifest, settings: Settings, revision: str, artifact: str
) -> Manifest:
    """The Deployment serving `revision` of the output repo (`artifact`: adapter, merged or
    full, as status.result.artifact says)."""
    serve, tpl = job.spec.serve, job.spec.template
    if serve is None:
        raise ValueError("the FineTuneJob has no spec.serve")
    labels = naming.serve_labels(job.metadata.name)
    annotations = {naming.ANNOTATION_SERVE_REVISION: revision}
    volumes: list[Manifest] = [
        {"name": "model", "emptyDir": {"sizeLimit": tpl.cache_size}},
        {"name": naming.CACHE_VOLUME, "emptyDir": {"sizeLimit": tpl.cache_size}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        *tpl.volumes,
    ]
    mounts: list[Manifest] = [
        {"name": "model", "mountPath": pod.SERVE_ROOT},
        {"name": naming.CACHE_VOLUME, "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *(m.model_dump(mode="json", by_alias=True, exclude_none=True) for m in tpl.volume_mounts),
    ]
    server = _server(job, settings, artifact)
    server["volumeMounts"] = mounts
    security: Manifest = {"seccompProfile": {"type": "RuntimeDefault"}}
    if tpl.security_context is not None:
        security.update(
            tpl.security_context.model_dump(mode="json", by_alias=True, exclude_none=True)
        )
    if serve.engine == "transformers":
        # The trainer image runs as a numeric non-root USER; the vLLM and TGI images run as root.
        security["runAsNonRoot"] = True
    pod_spec: Manifest = {
        "enableServiceLinks": False,
        # Neither the prepare step nor the server calls the API server.
        "automountServiceAccountToken": False,
        "securityContext": dict(sorted(security.items())),
        "initContainers": [_prepare_container(job, settings, revision, artifact, mounts)],
        "containers": [server],
        "volumes": volumes,
    }
    if tpl.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(tpl.node_selector.items()))
    if tpl.tolerations:
        pod_spec["tolerations"] = list(tpl.tolerations)
    if tpl.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in tpl.image_pull_secrets]
    meta = _metadata(job, owner)
    meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": serve.replicas,
            "selector": {"matchLabels": dict(labels)},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            # New pods must be Ready before an old one goes: a failed rollout keeps serving.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def render_serve_service(job: FineTuneJob, owner: Manifest) -> Manifest:
    """The ClusterIP Service in front of the serving pods that are Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.serve_labels(job.metadata.name),
            "ports": [
                {
                    "name": pod.SERVE_PORT_NAME,
                    "port": pod.SERVE_PORT,
                    "targetPort": pod.SERVE_PORT_NAME,
                }
            ],
        },
    }
