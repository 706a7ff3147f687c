"""spec.serve: validation, the rendered Deployment and Service of each engine (golden files and
contract tests), and status.serve derived from the rollout and the smoke request.

Regenerate the golden files after an intended change:
    UPDATE_GOLDEN=1 pytest tests/unit/test_serve.py
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from finetune_api import pod
from finetune_api.validation import ManifestError, load_manifest, parse_manifest
from finetune_operator import naming, serve_status
from finetune_operator.render import owner_reference
from finetune_operator.serve import (
    render_serve_deployment,
    render_serve_service,
    serve_url,
    served_model,
)
from finetune_operator.serve_status import Rollout, ServeReason, Smoke
from finetune_operator.settings import Settings
from finetune_operator.smoke import chat_smoke, judge

GOLDEN = Path(__file__).parent / "golden" / "serve"
ENGINES = ("transformers", "vllm", "tgi")
SETTINGS = Settings(trainer_image="ghcr.io/finetune-operator/trainer:test")
REVISION = "0123456789abcdef0123456789abcdef01234567"
NOW = "2026-01-01T00:00:00Z"


def _job(engine: str) -> Any:
    return load_manifest(GOLDEN / f"{engine}.input.yaml")


def _render(job: Any, artifact: str = "adapter") -> tuple[dict[str, Any], dict[str, Any]]:
    owner = owner_reference(job.metadata.name, job.metadata.uid)
    deployment = render_serve_deployment(job, owner, SETTINGS, REVISION, artifact)
    return deployment, render_serve_service(job, owner)


@pytest.mark.parametrize("engine", ENGINES)
def test_golden(engine: str) -> None:
    text = yaml.safe_dump_all(list(_render(_job(engine))), sort_keys=False)
    path = GOLDEN / f"{engine}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


# ---- validation ---------------------------------------------------------------------------------
VALID: dict[str, Any] = yaml.safe_load((GOLDEN / "transformers.input.yaml").read_text())


def _errors(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    return {e.path: e.message for e in err.value.errors}


def test_a_serve_block_without_a_push_target_is_refused() -> None:
    doc = copy.deepcopy(VALID)
    del doc["spec"]["output"]
    assert "push target" in _errors(doc)["spec.serve"]


def test_an_unknown_engine_is_refused_naming_the_engines() -> None:
    doc = copy.deepcopy(VALID)
    doc["spec"]["serve"]["engine"] = "triton"
    message = _errors(doc)["spec.serve.engine"]
    assert all(engine in message for engine in ENGINES)


def test_serve_needs_a_causal_lm() -> None:
    doc = copy.deepcopy(VALID)
    doc["spec"]["model"].update(task="sequence-classification", numLabels=2)
    assert "causal-lm" in _errors(doc)["spec.serve"]


def test_serve_defaults() -> None:
    doc = copy.deepcopy(VALID)
    doc["spec"]["serve"] = {}
    serve = parse_manifest(doc).spec.serve
    assert serve is not None
    assert (serve.engine, serve.replicas, serve.image) == ("transformers", 1, None)


def test_serve_is_the_one_mutable_section_besides_run_policy() -> None:
    """A changed spec.serve rolls out: the CRD's immutability rule must leave it out."""
    crd = yaml.safe_load(Path("crds/finetune.dev_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    immutable = [r["rule"] for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert immutable and all("serve" not in rule for rule in immutable)
    assert any("has(self.serve)" in r["rule"] for r in spec["x-kubernetes-validations"])


# ---- the rendered manifests: contracts per engine -----------------------------------------------
def _server(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _prepare(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["initContainers"][0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_serves_the_pushed_revision_from_an_owned_deployment(engine: str) -> None:
    job = _job(engine)
    deployment, service = _render(job)
    name = naming.serve_name(job.metadata.name)
    for obj in (deployment, service):
        assert obj["metadata"]["name"] == name
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["controller"] and ref["uid"] == job.metadata.uid  # deleted with the job
    prepare = _prepare(deployment)
    cmd = prepare["command"]
    assert cmd[cmd.index("--revision") + 1] == REVISION
    assert cmd[cmd.index("--repo") + 1] == served_model(job) == job.spec.output.hub.repo
    # The token only ever comes from the job's Secret: in no argument, anywhere.
    assert _env(prepare)[pod.HF_TOKEN_ENV] == {
        "secretKeyRef": {"name": job.spec.output.hub.token_secret_ref.name, "key": "token"}
    }
    text = json.dumps(deployment)
    assert "hf_" not in text
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"][naming.ANNOTATION_SERVE_REVISION] == REVISION
    # Never selected as a trainer: no job-name or attempt label.
    labels = template["metadata"]["labels"]
    assert naming.LABEL_ATTEMPT not in labels and "finetune.dev/job-name" not in labels
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"] == labels
    # A failed rollout keeps the old pods: none goes before a new one is Ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    server = _server(deployment)
    assert server["readinessProbe"]["httpGet"]["path"] == pod.SERVE_HEALTH_PATH
    assert server["ports"][0]["containerPort"] == pod.SERVE_PORT
    assert service["spec"]["ports"][0]["targetPort"] == server["ports"][0]["name"]


def test_transformers_merges_the_adapter_and_serves_it_by_repo_id_on_the_trainer_image() -> None:
    job = _job("transformers")
    deployment, _ = _render(job)
    prepare, server = _prepare(deployment), _server(deployment)
    assert "--no-merge" not in prepare["command"]
    assert prepare["command"][prepare["command"].index("--base") + 1] == "hf://org/tiny"
    assert server["image"] == prepare["image"] == SETTINGS.trainer_image
    assert server["command"] == ["transformers", "serve", "org/tiny-cpu-lora"]
    assert server["workingDir"] == pod.SERVE_ROOT
    assert _env(server)["HF_HUB_OFFLINE"] == "1"
    assert _env(prepare)["HF_ENDPOINT"] == "http://hub.finetune-demo.svc.cluster.local:8080"
    assert _env(prepare)["HF_HUB_DISABLE_XET"] == "1"  # template.env reaches the download
    assert server["resources"] == {
        "requests": {"cpu": "250m", "memory": "1Gi"},
        "limits": {"memory": "2Gi"},
    }
    # Its one torch process's threads fit its CPU, as a trainer rank's do (podspec.threads_env).
    assert _env(server)[pod.THREADS_ENV] == "1"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_vllm_loads_the_base_at_its_revision_and_the_adapter_through_its_lora_flags() -> None:
    job = _job("vllm")
    deployment, _ = _render(job)
    prepare, server = _prepare(deployment), _server(deployment)
    assert "--no-merge" in prepare["command"]
    assert server["image"] == SETTINGS.serve_vllm_image
    assert server["command"] == ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    args = server["args"]
    assert args[args.index("--revision") + 1] == job.spec.model.revision
    assert "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == (
        f"my-org/smollm2-news-lora={pod.SERVE_ROOT}/my-org/smollm2-news-lora"
    )
    assert args[args.index("--max-lora-rank") + 1] == "16"  # r=12 rounded up to vLLM's sizes
    # vLLM downloads the base itself, reading HF_TOKEN: the model's own read token goes there,
    # never the push token. The prepare step reads the output repo with the push token.
    assert _env(server)[pod.HF_TOKEN_ENV]["secretKeyRef"]["name"] == "hf-read"
    assert pod.MODEL_TOKEN_ENV not in _env(server)
    assert pod.THREADS_ENV not in _env(server)  # vLLM sizes its own processes' threads
    assert _env(prepare)[pod.HF_TOKEN_ENV]["secretKeyRef"]["name"] == "hf-token"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert "runAsNonRoot" not in deployment["spec"]["template"]["spec"]["securityContext"]


def test_vllm_serves_merged_weights_as_one_model_under_the_repo_id() -> None:
    job = _job("vllm")
    deployment, _ = _render(job, artifact="merged")
    server = _server(deployment)
    assert server["command"] == ["vllm", "serve", f"{pod.SERVE_ROOT}/my-org/smollm2-news-lora"]
    assert "--enable-lora" not in server["args"]
    assert server["args"][server["args"].index("--served-model-name") + 1] == served_model(job)


def test_tgi_names_the_adapter_in_lora_adapters() -> None:
    job = _job("tgi")
    deployment, _ = _render(job)
    server = _server(deployment)
    env = _env(server)
    assert server["image"] == "ghcr.io/huggingface/text-generation-inference:3.3.4"  # serve.image
    assert "command" not in server  # the image's own launcher
    assert env["MODEL_ID"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert env["LORA_ADAPTERS"] == (
        f"my-org/smollm2-news-lora={pod.SERVE_ROOT}/my-org/smollm2-news-lora"
    )
    assert env["PORT"] == str(pod.SERVE_PORT)
    merged = _env(_server(_render(job, artifact="full")[0]))
    assert merged["MODEL_ID"] == f"{pod.SERVE_ROOT}/my-org/smollm2-news-lora"
    assert "LORA_ADAPTERS" not in merged


@pytest.mark.parametrize("where", ["limits", "requests"])
def test_vllm_and_tgi_shard_the_model_over_every_gpu_of_the_container(where: str) -> None:
    """A 70B model on 4 GPUs is one model over the 4 (tensor parallel), not one GPU's worth of
    it failing to load while 3 GPUs idle. One GPU keeps the engines' own default."""

    def server(engine: str, gpus: int) -> dict[str, Any]:
        doc = yaml.safe_load((GOLDEN / f"{engine}.input.yaml").read_text())
        doc["spec"]["serve"]["resources"] = {where: {"nvidia.com/gpu": gpus, "cpu": "8"}}
        return _server(_render(parse_manifest(doc))[0])

    assert server("vllm", 4)["args"][-2:] == ["--tensor-parallel-size", "4"]
    assert "--tensor-parallel-size" not in server("vllm", 1)["args"]
    assert _env(server("tgi", 4))["NUM_SHARD"] == "4"
    assert "NUM_SHARD" not in _env(server("tgi", 1))


def test_engine_images_come_from_the_chart_values() -> None:
    values = yaml.safe_load(Path("charts/finetune-operator/values.yaml").read_text())
    settings = Settings.from_chart_values(values, app_version="1.0.0")
    assert settings.serve_vllm_image == values["serve"]["vllmImage"] == Settings().serve_vllm_image
    assert settings.serve_tgi_image == values["serve"]["tgiImage"] == Settings().serve_tgi_image
    values["serve"] = {"vllmImage": "mirror.local/vllm:1", "tgiImage": "mirror.local/tgi:1"}
    settings = Settings.from_chart_values(values, app_version="1.0.0")
    assert (settings.serve_vllm_image, settings.serve_tgi_image) == (
        "mirror.local/vllm:1",
        "mirror.local/tgi:1",
    )


# ---- status.serve -------------------------------------------------------------------------------
def _succeeded(engine: str = "transformers", serve: dict[str, Any] | None = None) -> Any:
    job = _job(engine)
    status: dict[str, Any] = {
        "phase": "Succeeded",
        "result": {"repo": "org/tiny-cpu-lora", "revision": REVISION, "artifact": "adapter"},
    }
    if serve is not None:
        status["serve"] = serve
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["status"] = status
    return parse_manifest(doc)


def _rollout(
    revision: str = REVISION, *, complete: bool = True, failed: bool = False, available: int = 1
) -> Rollout:
    return Rollout(revision, complete, failed, available, "deadline exceeded" if failed else "")


def test_nothing_is_served_before_the_job_succeeded() -> None:
    job = _job("transformers")
    assert serve_status.target(job) is None
    served = serve_status.derive(job, None, None, NOW)
    assert served is not None
    assert (served["reason"], served["ready"]) == ("Waiting", False)
    assert "revision" not in served
    assert served["url"] == serve_url(job) == ("http://tiny-cpu-serve.finetune-demo.svc:8000/v1")


def test_a_failed_job_serves_nothing_and_says_why() -> None:
    job = _succeeded()
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["status"] = {"phase": "Failed", "result": {"artifact": "adapter"}}
    failed = parse_manifest(doc)
    assert serve_status.target(failed) is None
    served = serve_status.derive(failed, None, None, NOW)
    assert served is not None and served["reason"] == "Waiting" and "Failed" in served["message"]


def test_a_revision_is_served_only_after_its_rollout_and_smoke_request() -> None:
    job = _succeeded()
    rolling = serve_status.derive(job, _rollout(complete=False, available=0), None, NOW)
    assert rolling is not None
    assert (rolling["reason"], rolling["ready"]) == ("RollingOut", False)
    assert "revision" not in rolling
    assert serve_status.needs_smoke(None, serve_status.target(job), _rollout())
    served = serve_status.derive(job, _rollout(), Smoke(True), NOW)
    assert served is not None
    assert (served["reason"], served["ready"], served["revision"]) == ("Serving", True, REVISION)
    assert served["engine"] == "transformers" and served["model"] == "org/tiny-cpu-lora"


def test_only_a_revision_nothing_was_applied_for_needs_a_pass_that_did_not_ask_to_serve() -> None:
    """Passes that no serving Deployment event asked for (the Job's, progress) read nothing of
    serving, except the one that saw the job succeed: it makes the Deployment."""
    waiting = {"reason": "Waiting", "ready": False, "lastTransitionTime": NOW}
    assert not serve_status.unapplied(_job("transformers"))  # not Succeeded: nothing to serve
    assert serve_status.unapplied(_succeeded())
    assert serve_status.unapplied(_succeeded(serve=waiting))
    rolling = {"reason": "RollingOut", "ready": False, "lastTransitionTime": NOW}
    assert not serve_status.unapplied(_succeeded(serve=rolling))


def test_a_serving_revision_is_not_smoked_again_on_every_pass() -> None:
    serving = {"reason": "Serving", "ready": True, "revision": REVISION, "lastTransitionTime": NOW}
    job = _succeeded(serve=serving)
    assert not serve_status.needs_smoke(serving, serve_status.target(job), _rollout())
    again = serve_status.derive(job, _rollout(), None, "2026-01-01T01:00:00Z")
    assert again is not None and again["reason"] == "Serving" and again["ready"]
    assert again["lastTransitionTime"] == NOW  # no transition: the time stays


def test_a_failed_smoke_request_keeps_the_revision_unpromoted() -> None:
    job = _succeeded()
    served = serve_status.derive(job, _rollout(), Smoke(False, "HTTP 500: boom"), NOW)
    assert served is not None
    assert (served["reason"], served["ready"]) == ("SmokeFailed", False)
    assert "revision" not in served and "HTTP 500" in served["message"]


def test_a_failed_rollout_keeps_the_previous_revision_serving() -> None:
    old = "f" * 40
    serving = {"reason": "Serving", "ready": True, "revision": old, "lastTransitionTime": NOW}
    job = _succeeded(serve=serving)
    # A changed spec.serve (say, a new image) rolls out; old pods answer meanwhile.
    during = serve_status.derive(job, _rollout(complete=False, available=1), None, NOW)
    assert during is not None
    assert (during["reason"], during["ready"], during["revision"]) == ("RollingOut", True, old)
    failed = serve_status.derive(job, _rollout(complete=False, failed=True), None, NOW)
    assert failed is not None
    assert (failed["reason"], failed["ready"], failed["revision"]) == ("RolloutFailed", True, old)
    assert f"revision {old} is still serving" in failed["message"]


def test_a_name_held_by_someone_else_is_reported_not_taken() -> None:
    job = _succeeded()
    blocked = (ServeReason.NAME_CONFLICT, "Deployment tiny-cpu-serve already exists")
    served = serve_status.derive(job, None, None, NOW, blocked)
    assert served is not None and served["reason"] == "NameConflict" and not served["ready"]


def test_status_serve_fits_the_schema() -> None:
    job = _succeeded()
    served = serve_status.derive(job, _rollout(), Smoke(True), NOW)
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["status"]["serve"] = served
    assert parse_manifest(doc).status.serve.revision == REVISION


@pytest.mark.parametrize(
    ("deployment", "complete", "failed"),
    [
        ({"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "observedGeneration": 2},
         True, False),
        ({"replicas": 2, "updatedReplicas": 1, "availableReplicas": 1, "observedGeneration": 2},
         False, False),
        ({"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "observedGeneration": 1},
         False, False),
        ({"replicas": 2, "updatedReplicas": 1, "availableReplicas": 1, "observedGeneration": 2,
          "conditions": [{"type": "Progressing", "status": "False",
                          "reason": "ProgressDeadlineExceeded", "message": "timed out"}]},
         False, True),
    ],
)  # fmt: skip
def test_read_rollout(deployment: dict[str, Any], complete: bool, failed: bool) -> None:
    obj = {
        "metadata": {"generation": 2},
        "spec": {
            "replicas": 1,
            "template": {"metadata": {"annotations": {naming.ANNOTATION_SERVE_REVISION: "abc"}}},
        },
        "status": deployment,
    }
    rollout = serve_status.read_rollout(obj)
    assert rollout is not None
    assert (rollout.complete, rollout.failed, rollout.revision) == (complete, failed, "abc")


# ---- the smoke request --------------------------------------------------------------------------
def test_judge_wants_a_chat_completion_with_text() -> None:
    answer = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}
    assert judge(200, answer).ok
    assert not judge(200, {"choices": []}).ok
    assert not judge(400, {"detail": "pinned"}).ok
    assert not judge(200, {"choices": [{"message": {"content": None}}]}).ok


def test_chat_smoke_against_a_real_http_server() -> None:
    seen: list[dict[str, Any]] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body["model"] != "org/tiny-cpu-lora":
            return web.json_response({"detail": "unknown model"}, status=400)
        return web.json_response({"choices": [{"message": {"content": "hello"}}]})

    async def run() -> tuple[Smoke, Smoke, Smoke]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}/v1"
        try:
            good = await chat_smoke(base, "org/tiny-cpu-lora", timeout=10)
            wrong = await chat_smoke(base, "other", timeout=10)
        finally:
            await runner.cleanup()
        gone = await chat_smoke(base, "org/tiny-cpu-lora", timeout=5)
        return good, wrong, gone

    good, wrong, gone = asyncio.run(run())
    assert good.ok
    assert not wrong.ok and "HTTP 400" in wrong.message
    assert not gone.ok and gone.message  # nothing listens any more: a verdict, not an error
    assert seen[0]["messages"][0]["role"] == "user" and seen[0]["max_tokens"] > 0


def test_finetune_status_shows_what_is_served() -> None:
    from finetune_cli.status import summary, text

    job = _succeeded()
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["status"]["serve"] = serve_status.derive(job, _rollout(), Smoke(True), NOW)
    assert summary(doc)["serve"]["revision"] == REVISION
    out = text(doc)
    assert f"Serving:    Serving (ready), {REVISION}" in out
    assert "http://tiny-cpu-serve.finetune-demo.svc:8000/v1 model org/tiny-cpu-lora" in out


def test_finetune_render_shows_what_will_serve() -> None:
    """`finetune render` (render_manifests) adds the serving objects after the gang's, for a
    placeholder revision and the artifact the push will be."""
    from finetune_operator.render import PLACEHOLDER_REVISION, expected_artifact, render_manifests

    job = _job("vllm")
    docs = render_manifests(job, SETTINGS)
    assert [d["kind"] for d in docs[-2:]] == ["Deployment", "Service"]
    prepare = _prepare(docs[-2])["command"]
    assert prepare[prepare.index("--revision") + 1] == PLACEHOLDER_REVISION
    assert expected_artifact(job) == "adapter" and "--no-merge" in prepare
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["output"]["hub"]["merge"] = True
    merged = parse_manifest(doc)
    assert expected_artifact(merged) == "merged"
    assert "--enable-lora" not in _server(render_manifests(merged, SETTINGS)[-2])["args"]
    del doc["spec"]["serve"]
    assert "Deployment" not in {d["kind"] for d in render_manifests(parse_manifest(doc), SETTINGS)}
