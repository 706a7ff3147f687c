"""Golden-file tests of the pure renderers.

Regenerate after an intended change:  UPDATE_GOLDEN=1 pytest tests/unit/test_render.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import pod
from finetune_api.v1alpha1 import SecretKeyRef
from finetune_api.validation import load_manifest
from finetune_operator.checkpoints import choose
from finetune_operator.render import (
    owner_reference,
    render_checkpoint_claim,
    render_configmap,
    render_job,
    render_manifests,
    render_service,
)
from finetune_operator.settings import Settings

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name.removesuffix(".input.yaml") for p in GOLDEN.glob("*.input.yaml"))
SETTINGS = Settings(trainer_image="ghcr.io/finetune-operator/trainer:test")


def _render(case: str) -> list[dict[str, Any]]:
    return render_manifests(load_manifest(GOLDEN / f"{case}.input.yaml"), SETTINGS)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    text = yaml.safe_dump_all(_render(case), sort_keys=False)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_cases_cover_every_accelerator() -> None:
    assert {"cpu", "gpu", "tpu"} <= set(CASES)


def _job(case: str) -> dict[str, Any]:
    return next(d for d in _render(case) if d["kind"] == "Job")


def _container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(job)["env"]}


def test_rendezvous_env_points_at_rank0_through_the_headless_service() -> None:
    _cm, svc, job = _render("cpu")
    env = _env(job)
    assert env["MASTER_ADDR"] == "smollm2-news-lora-0.smollm2-news-lora"
    assert env["MASTER_PORT"] == "29500"
    assert env["NNODES"] == "2"
    assert env["NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["LOG_LEVEL"] == "debug"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {29500, 9400}


def test_each_hub_token_reaches_the_pod_from_its_secret_under_its_own_name() -> None:
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    spec = ftj.spec.model_copy(deep=True)
    spec.model = spec.model.model_copy(
        update={"token_secret_ref": SecretKeyRef(name="model-read", key="m")}
    )
    spec.dataset = spec.dataset.model_copy(
        update={"source": "hf://org/data", "token_secret_ref": SecretKeyRef(name="data-read")}
    )
    rendered = render_manifests(ftj.model_copy(update={"spec": spec}), SETTINGS)
    job = next(d for d in rendered if d["kind"] == "Job")
    env = _env(job)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["FINETUNE_MODEL_TOKEN"] == {"secretKeyRef": {"name": "model-read", "key": "m"}}
    assert env["FINETUNE_DATASET_TOKEN"] == {"secretKeyRef": {"name": "data-read", "key": "token"}}
    # Only ever from the Secret: no token value in the manifest, and each name set once.
    names = [e["name"] for e in _container(job)["env"]]
    for name in pod.HUB_TOKEN_ENVS:
        assert names.count(name) == 1
        assert all("value" not in e for e in _container(job)["env"] if e["name"] == name)
    # Without read tokens the pod gets the push token alone, as before.
    plain = _env(_job("cpu"))
    assert "HF_TOKEN" in plain
    assert not {pod.MODEL_TOKEN_ENV, pod.DATASET_TOKEN_ENV} & set(plain)


def test_job_is_an_indexed_gang_that_fails_fast() -> None:
    spec = _job("cpu")["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [3, 4]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["ttlSecondsAfterFinished"] == 3600


def test_pod_passes_restricted_pod_security() -> None:
    pod = _job("cpu")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The trainer never calls the API server, so its pods carry no ServiceAccount token.
    assert pod["automountServiceAccountToken"] is False
    sc = _container(_job("cpu"))["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in _container(_job("cpu"))["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/checkpoints", "/etc/finetune"} <= mounts


def test_gpu_resources_queue_and_overrides() -> None:
    job = _job("gpu")
    res = _container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True  # Kueue admits by unsuspending
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert _container(job)["image"] == "registry.example/trainer:custom"
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["priorityClassName"] == "training"
    assert pod["serviceAccountName"] == "trainer"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"] == {"claimName": "ckpt"}
    assert "data" in vols


def test_tpu_node_selectors_and_suspend() -> None:
    job = _job("tpu")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "2x4",
    }
    assert _container(job)["resources"]["limits"]["google.com/tpu"] == "4"
    assert job["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_configmap_holds_spec_only_never_status_or_env_values() -> None:
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    ftj_with_status = ftj.model_copy(update={"status": None})
    cm = render_configmap(ftj_with_status, owner_reference("x", "uid"))
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert doc["metadata"] == {"name": "smollm2-news-lora", "namespace": "ml"}
    assert "env" not in doc["spec"]["template"]
    # The trainer must be able to read it back.
    from finetune_api.validation import parse_manifest

    assert parse_manifest(doc).spec == ftj.spec.model_copy(
        update={"template": ftj.spec.template.model_copy(update={"env": []})}
    )


def test_children_are_owned_and_labelled() -> None:
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    owner = owner_reference(ftj.metadata.name, "1234")
    store = choose(ftj, default_storage_class=True)
    for obj in (
        render_configmap(ftj, owner),
        render_service(ftj, owner),
        render_checkpoint_claim(ftj, owner),
        render_job(ftj, owner, 3, SETTINGS, store),
    ):
        assert obj["metadata"]["ownerReferences"] == [owner]
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
        assert obj["metadata"]["labels"]["finetune.dev/job-name"] == "smollm2-news-lora"
    job = render_job(ftj, owner, 3, SETTINGS, store)
    assert job["metadata"]["labels"]["finetune.dev/attempt"] == "3"
    assert job["spec"]["template"]["metadata"]["labels"]["finetune.dev/attempt"] == "3"


def test_render_is_deterministic() -> None:
    assert _render("gpu") == _render("gpu")


def test_default_resources_apply_only_to_jobs_that_set_none() -> None:
    defaults = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    settings = Settings(trainer_default_resources=defaults)
    own = load_manifest(GOLDEN / "gpu.input.yaml")
    assert own.spec.resources.requests
    # The job's own requests and limits win whole; the defaults are not merged into them.
    mine = _container(render_manifests(own, settings)[-1])["resources"]
    assert mine == _container(_render("gpu")[2])["resources"]

    bare = own.model_copy(deep=True)
    bare.spec.resources.requests, bare.spec.resources.limits = {}, {}
    res = _container(render_manifests(bare, settings)[-1])["resources"]
    # The accelerator's extended resource still goes on top.
    assert res == {
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "8"},
    }
    without_defaults = _container(render_manifests(bare, Settings())[-1])["resources"]
    assert without_defaults == {
        "requests": {"nvidia.com/gpu": "8"},
        "limits": {"nvidia.com/gpu": "8"},
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{cpu: 2}", "is not JSON"),
        ('{"request": {"cpu": "2"}}', "only requests and limits"),
        ('{"requests": {"cpu": true}}', "requests must map resource names to quantities"),
    ],
)
def test_malformed_default_resources_stop_the_operator(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"FINETUNE_TRAINER_DEFAULT_RESOURCES": value})
