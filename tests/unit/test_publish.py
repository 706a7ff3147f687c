"""push_to_hub against the local Hub-API test double, with the real huggingface_hub and peft.

The push itself passes the endpoint to HfApi explicitly. The checks that read the result back
(ModelCard.load, PeftModel.from_pretrained) use huggingface_hub's module-level endpoint, which is
read from HF_ENDPOINT at import time (possibly by another test module), so those constants are
patched for the duration of a test.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_api.v1alpha1 import FineTuneJob
from finetune_hub_double import server as hub_double
from finetune_trainer.hub_retry import Backoff
from finetune_trainer.publish import PushError, PushResult, push_to_hub

TOKEN = "hf_publishtest_good_0123456789abcdef"
BAD_TOKEN = "hf_publishtest_bad_9876543210fedcba"
REPO = "test-org/tiny-gpt2-lora"
SCORES = {"perplexity": {"before": 60.0, "after": 42.0}}


def make_job(endpoint: str | None, repo: str = REPO) -> FineTuneJob:
    hub: dict[str, Any] = {"repo": repo, "private": True}
    if endpoint:
        hub["endpoint"] = endpoint
    return FineTuneJob.model_validate(
        {
            "metadata": {"name": "tiny-gpt2", "namespace": "ml"},
            "spec": {
                "model": {"source": "hf://test-org/tiny-gpt2"},
                "dataset": {"source": "hf://test-org/tiny-text", "evalSplit": "test"},
                "peft": {"r": 2, "alpha": 4, "targetModules": ["c_attn"]},
                "evaluation": {"metrics": ["perplexity"], "gates": {"perplexity": 100}},
                "output": {"hub": hub},
            },
        }
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # A low LFS threshold sends the adapter weights through the LFS upload path, as on the Hub.
    double = hub_double.HubDouble(
        tmp_path_factory.mktemp("hub-root"), tokens=[TOKEN], lfs_threshold=1000, faults=True
    )
    endpoint = double.start()
    yield endpoint
    double.stop()


@pytest.fixture
def hf_env(hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Handler]:
    """Point huggingface_hub at the double and capture every log record at DEBUG."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import logging as hf_logging

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub + "/{repo_id}/resolve/{revision}/{filename}"
    )
    # hf_api's module-level functions (file_exists, used by peft) are bound to a singleton HfApi
    # whose endpoint was fixed when hf_api was first imported.
    monkeypatch.setattr(hf_api.api, "endpoint", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.records = records  # type: ignore[attr-defined]
    root = logging.getLogger()
    old_root, old_hf = root.level, hf_logging.get_verbosity()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    hf_logging.set_verbosity_debug()
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_root)
    hf_logging.set_verbosity(old_hf)


def tiny_adapter(tmp_path: Path) -> tuple[Any, Path, Path]:
    """A tiny GPT-2 base (saved) and a non-trivial LoRA r=2 adapter on it (saved)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "artifact"
    GPT2LMHeadModel(config).save_pretrained(base_dir)
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    # init_lora_weights=False: random B too, so the adapter changes the logits and a wrong or
    # missing download would show.
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora).eval()
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


def test_push_adapter_round_trip(hub: str, hf_env: logging.Handler, tmp_path: Path, capfd) -> None:
    from huggingface_hub import HfApi, ModelCard, hf_hub_download, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model, base_dir, adapter_dir = tiny_adapter(tmp_path)
    result = push_to_hub(make_job(hub), adapter_dir, SCORES, "adapter")

    assert isinstance(result, PushResult)
    api = HfApi(endpoint=hub, token=TOKEN)
    info = api.repo_info(REPO)
    assert result.repo == REPO
    assert result.revision == info.sha
    assert result.url == f"{hub}/{REPO}/commit/{info.sha}"
    assert info.private is True
    files = set(api.list_repo_files(REPO, revision=result.revision))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= files
    assert (adapter_dir / "README.md").is_file()
    (weights,) = api.get_paths_info(REPO, ["adapter_model.safetensors"], revision=result.revision)
    assert weights.lfs is not None  # went through the LFS upload path

    card = ModelCard.load(REPO, token=TOKEN)
    assert card.data.base_model == "test-org/tiny-gpt2"
    assert card.data.library_name == "peft"
    readme = hf_hub_download(REPO, "README.md", revision=result.revision, token=TOKEN)
    meta = metadata_load(readme)
    assert meta is not None
    _, results = model_index_to_eval_results(meta["model-index"])
    assert [(r.metric_type, r.metric_value) for r in results] == [("perplexity", 42.0)]

    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = GPT2LMHeadModel.from_pretrained(base_dir)
        plain = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, REPO, revision=result.revision, token=TOKEN)
        got = loaded.eval()(input_ids=ids).logits
    assert not torch.allclose(plain, expected)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    out, err = capfd.readouterr()
    logs = "\n".join(hf_env.records)  # type: ignore[attr-defined]
    assert logs  # DEBUG logging was on, so the check below means something
    for text in (logs, out, err):
        assert TOKEN not in text


def test_second_push_is_a_new_commit_on_the_same_repo(
    hub: str, hf_env: logging.Handler, tmp_path: Path
) -> None:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    job = make_job(hub, repo="test-org/twice")
    first = push_to_hub(job, folder, SCORES, "adapter")
    (folder / "adapter_config.json").write_text('{"r": 2}')
    second = push_to_hub(job, folder, SCORES, "adapter")
    assert first.revision != second.revision
    from huggingface_hub import HfApi

    assert HfApi(endpoint=hub, token=TOKEN).repo_info("test-org/twice").sha == second.revision


def test_endpoint_from_env_when_spec_has_none(
    hub: str, hf_env: logging.Handler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub + "/")
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = push_to_hub(make_job(None, repo="test-org/from-env"), folder, {}, "merged")
    assert result.url.startswith(hub + "/test-org/from-env/commit/")


def test_bad_token_is_redacted(
    hub: str,
    hf_env: logging.Handler,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd,
) -> None:
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(PushError) as info:
        push_to_hub(make_job(hub, repo="test-org/rejected"), folder, SCORES, "adapter")
    message = str(info.value)
    assert "401" in message or "nauthorized" in message or "credentials" in message.lower()
    assert info.value.permanent  # a bad token does not get better with retries
    assert info.value.__suppress_context__
    out, err = capfd.readouterr()
    logs = "\n".join(hf_env.records)  # type: ignore[attr-defined]
    for text in (message, repr(info.value), logs, out, err):
        assert BAD_TOKEN not in text


def test_no_hub_output_or_folder_is_an_error(tmp_path: Path) -> None:
    job = make_job(None)
    job.spec.output.hub = None
    with pytest.raises(PushError, match=r"output\.hub"):
        push_to_hub(job, tmp_path, {}, "adapter")
    with pytest.raises(PushError, match="does not exist"):
        push_to_hub(make_job(None), tmp_path / "missing", {}, "adapter")


# Short waits: what is tested is which failures are retried, not how long the waits are.
QUICK = Backoff(retries=3, base_seconds=0.01, max_seconds=0.02)


def fault(endpoint: str, method: str, order: dict[str, Any] | None = None) -> dict[str, Any]:
    """Order the double's test faults over HTTP (finetune_hub_double.faults)."""
    request = urllib.request.Request(
        f"{endpoint}/_test/faults",
        method=method,
        data=json.dumps(order).encode() if order else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def artifact(tmp_path: Path, hub: str) -> Iterator[Path]:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    fault(hub, "DELETE")
    yield folder
    fault(hub, "DELETE")


@pytest.mark.parametrize("kind", ["commit", "create", "preupload"])
def test_transient_failures_are_retried_in_process(
    hub: str, hf_env: logging.Handler, artifact: Path, kind: str
) -> None:
    fault(hub, "POST", {"kind": kind, "status": 503, "count": 2})
    result = push_to_hub(
        make_job(hub, repo=f"test-org/flaky-{kind}"), artifact, SCORES, "adapter", QUICK
    )
    from huggingface_hub import HfApi

    assert HfApi(endpoint=hub, token=TOKEN).repo_info(result.repo).sha == result.revision
    assert fault(hub, "GET")["fired"] == {kind: 2}


def test_rate_limits_are_retried_and_retries_are_bounded(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    fault(hub, "POST", {"kind": "commit", "status": 429, "count": 1})
    push_to_hub(make_job(hub, repo="test-org/limited"), artifact, SCORES, "adapter", QUICK)
    assert fault(hub, "GET")["fired"] == {"commit": 1}
    fault(hub, "DELETE")
    fault(hub, "POST", {"kind": "commit", "status": 502, "count": 100})
    with pytest.raises(PushError, match="after 4 attempts") as info:
        push_to_hub(make_job(hub, repo="test-org/down"), artifact, SCORES, "adapter", QUICK)
    assert not info.value.permanent  # the next attempt of the job may still get through
    assert fault(hub, "GET")["fired"] == {"commit": QUICK.retries + 1}


@pytest.mark.parametrize(("kind", "status"), [("commit", 403), ("create", 404), ("commit", 401)])
def test_refusals_end_at_once(
    hub: str, hf_env: logging.Handler, artifact: Path, kind: str, status: int
) -> None:
    """401, 403 and a namespace that is not there: permanent, and not retried."""
    fault(hub, "POST", {"kind": kind, "status": status, "count": 5})
    with pytest.raises(PushError, match="retrying cannot help") as info:
        push_to_hub(make_job(hub, repo="test-org/refused"), artifact, SCORES, "adapter", QUICK)
    assert info.value.permanent
    assert str(status) in str(info.value)
    assert TOKEN not in str(info.value)
    assert fault(hub, "GET")["fired"] == {kind: 1}


def test_connection_errors_are_retried(hf_env: logging.Handler, artifact: Path) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    backoff = Backoff(retries=1, base_seconds=0.01)
    with pytest.raises(PushError, match="after 2 attempts") as info:
        push_to_hub(
            make_job(closed, repo="test-org/unreachable"), artifact, SCORES, "adapter", backoff
        )
    assert not info.value.permanent
    records = "\n".join(hf_env.records)  # type: ignore[attr-defined]
    assert "retrying" in records and TOKEN not in records


# ---- visibility: output.hub.private on a repo that exists -----------------------------------


def _hub_api(hub: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub, token=TOKEN)


def test_private_makes_an_existing_public_repo_private(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    api, repo = _hub_api(hub), "test-org/was-public"
    api.create_repo(repo, private=False)
    result = push_to_hub(make_job(hub, repo=repo), artifact, SCORES, "adapter", QUICK)
    assert api.repo_info(repo).private is True
    assert result.note == f"{hub}/{repo} was public; made it private, as output.hub.private asks"
    assert any(result.note in line for line in hf_env.records)  # type: ignore[attr-defined]
    # Once private, the next push has nothing to say.
    again = push_to_hub(make_job(hub, repo=repo), artifact, SCORES, "adapter", QUICK)
    assert again.note == ""


def test_a_public_repo_that_cannot_be_made_private_gets_nothing(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    api, repo = _hub_api(hub), "test-org/stays-public"
    api.create_repo(repo, private=False)
    fault(hub, "POST", {"kind": "settings", "status": 403, "count": 5})
    with pytest.raises(PushError, match=r"output\.hub\.private is true") as info:
        push_to_hub(make_job(hub, repo=repo), artifact, SCORES, "adapter", QUICK)
    assert info.value.permanent  # the same token would be refused again
    assert "403" in str(info.value) and "private: false" in str(info.value)
    assert TOKEN not in str(info.value)
    assert fault(hub, "GET")["fired"] == {"settings": 1}
    assert api.repo_info(repo).private is False
    assert [c.title for c in api.list_repo_commits(repo)] == ["initial commit"]  # no upload


def test_private_false_never_publishes_a_private_repo(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    api, repo = _hub_api(hub), "test-org/kept-private"
    api.create_repo(repo, private=True)
    job = make_job(hub, repo=repo)
    job.spec.output.hub.private = False  # type: ignore[union-attr]
    assert push_to_hub(job, artifact, SCORES, "adapter", QUICK).note == ""
    assert api.repo_info(repo).private is True
    new = make_job(hub, repo="test-org/new-public")
    new.spec.output.hub.private = False  # type: ignore[union-attr]
    push_to_hub(new, artifact, SCORES, "adapter", QUICK)
    assert api.repo_info("test-org/new-public").private is False


# ---- the model card's license ---------------------------------------------------------------


def _pushed_card(hub: str, job: FineTuneJob, artifact: Path) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download, metadata_load

    result = push_to_hub(job, artifact, SCORES, "adapter", QUICK)
    meta = metadata_load(
        hf_hub_download(result.repo, "README.md", revision=result.revision, token=TOKEN)
    )
    assert meta is not None
    return meta


def _base_with_card(hub: str, repo: str, front_matter: str) -> None:
    api = _hub_api(hub)
    api.create_repo(repo, exist_ok=True)
    card = f"---\n{front_matter}---\n\n# {repo}\n".encode()
    api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo)


def test_the_card_license_is_the_spec_s_else_the_base_model_s(
    hub: str, hf_env: logging.Handler, artifact: Path, tmp_path: Path
) -> None:
    licensed = make_job(hub, repo="test-org/licensed")
    licensed.spec.output.hub.license = "apache-2.0"  # type: ignore[union-attr]
    _base_with_card(hub, "test-org/mit-base", "license: mit\n")
    licensed.spec.model.source = "hf://test-org/mit-base"
    assert _pushed_card(hub, licensed, artifact)["license"] == "apache-2.0"  # the spec wins

    inherits = make_job(hub, repo="test-org/inherits")
    inherits.spec.model.source = "hf://test-org/mit-base"
    assert _pushed_card(hub, inherits, artifact)["license"] == "mit"

    other = "license: other\nlicense_name: tiny-license\nlicense_link: https://example.com/l\n"
    _base_with_card(hub, "test-org/other-base", other)
    custom = make_job(hub, repo="test-org/custom-license")
    custom.spec.model.source = "hf://test-org/other-base"
    meta = _pushed_card(hub, custom, artifact)
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other",
        "tiny-license",
        "https://example.com/l",
    )

    local = tmp_path / "local-base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: bsd-3-clause\n---\n")
    from_folder = make_job(hub, repo="test-org/local-base")
    from_folder.spec.model.source = f"file://{local}"
    assert _pushed_card(hub, from_folder, artifact)["license"] == "bsd-3-clause"


def test_no_base_license_no_card_license_and_a_warning(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    job = make_job(hub, repo="test-org/unlicensed")
    job.spec.model.source = "hf://test-org/no-such-base"
    assert "license" not in _pushed_card(hub, job, artifact)
    records = "\n".join(hf_env.records)  # type: ignore[attr-defined]
    assert "the model card gets no license" in records and "output.hub.license" in records


# ---- where the push lands: output.hub.branch and output.hub.createPr --------------------------


def test_push_to_a_branch_creates_it_and_leaves_main(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    api, repo = _hub_api(hub), "test-org/on-a-branch"
    job = make_job(hub, repo=repo)
    job.spec.output.hub.branch = "experiments/run-1"  # type: ignore[union-attr]
    first = push_to_hub(job, artifact, SCORES, "adapter", QUICK)
    assert (first.branch, first.pr_revision, first.pr_url) == ("experiments/run-1", None, None)
    assert api.repo_info(repo, revision="experiments/run-1").sha == first.revision
    assert first.url == f"{hub}/{repo}/commit/{first.revision}"
    assert "adapter_config.json" in api.list_repo_files(repo, revision="experiments/run-1")
    assert api.list_repo_files(repo) == [".gitattributes"]  # main: only the repo's creation

    # The branch exists now: the next push commits on top of it.
    (artifact / "adapter_config.json").write_text('{"r": 4}')
    second = push_to_hub(job, artifact, SCORES, "adapter", QUICK)
    history = [c.commit_id for c in api.list_repo_commits(repo, revision="experiments/run-1")]
    assert history[:2] == [second.revision, first.revision]
    assert api.list_repo_files(repo) == [".gitattributes"]


def test_create_pr_opens_a_pull_request_against_main(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    api, repo = _hub_api(hub), "test-org/reviewed"
    job = make_job(hub, repo=repo)
    job.spec.output.hub.create_pr = True  # type: ignore[union-attr]
    first = push_to_hub(job, artifact, SCORES, "adapter", QUICK)
    assert (first.pr_revision, first.branch) == ("refs/pr/1", None)
    assert first.pr_url == f"{hub}/{repo}/discussions/1"
    assert api.repo_info(repo, revision="refs/pr/1").sha == first.revision
    assert {"README.md", "adapter_config.json"} <= set(
        api.list_repo_files(repo, revision="refs/pr/1")
    )
    assert api.list_repo_files(repo) == [".gitattributes"]  # main is left for the review
    details = api.get_discussion_details(repo, 1)
    assert (details.is_pull_request, details.target_branch) == (True, "refs/heads/main")
    assert [e.oid for e in details.events if e.type == "commit"] == [first.revision]
    # Each push opens a pull request of its own.
    assert push_to_hub(job, artifact, SCORES, "adapter", QUICK).pr_revision == "refs/pr/2"


def test_create_pr_with_nothing_new_for_main_opens_none_and_says_so(
    hub: str, hf_env: logging.Handler, artifact: Path
) -> None:
    api, repo = _hub_api(hub), "test-org/already-there"
    on_main = push_to_hub(make_job(hub, repo=repo), artifact, SCORES, "adapter", QUICK)
    job = make_job(hub, repo=repo)
    job.spec.output.hub.create_pr = True  # type: ignore[union-attr]
    again = push_to_hub(job, artifact, SCORES, "adapter", QUICK)
    # huggingface_hub skips a commit that changes nothing; the result says what happened.
    assert (again.revision, again.branch, again.pr_revision) == (on_main.revision, "main", None)
    assert "no pull request was opened" in again.note
    assert api.list_repo_refs(repo, include_pull_requests=True).pull_requests == []


# ---- tokens: the push token pushes, the model's read token reads the model ---------------------

PUSH_TOKEN = "hf_publishtest_push_0123456789abcdef"
MODEL_READ_TOKEN = "model-read-token-of-a-self-hosted-hub"


@pytest.fixture
def guarded_hub(tmp_path: Path) -> Iterator[hub_double.HubDouble]:
    """A double where the read token may only read and nothing is readable anonymously, with a
    base model whose card names a license (the push reads it)."""
    double = hub_double.HubDouble(
        tmp_path / "guarded-root",
        tokens={PUSH_TOKEN: "pusher"},
        read_tokens={MODEL_READ_TOKEN: "model-reader"},
        require_auth_for_read=True,
    )
    base = tmp_path / "base-card"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    double.seed("test-org/guarded-base", base)
    double.start()
    yield double
    double.stop()


def _users(double: hub_double.HubDouble, repo: str) -> set[str | None]:
    """The users that asked the double about `repo`."""
    return {user for _, path, user in double.requests if f"/{repo}" in path}


@pytest.mark.parametrize("read_token", [MODEL_READ_TOKEN, None])
def test_the_push_token_pushes_and_the_model_token_reads_the_model(
    guarded_hub: hub_double.HubDouble,
    hf_env: logging.Handler,
    artifact: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    read_token: str | None,
) -> None:
    monkeypatch.setenv("HF_TOKEN", PUSH_TOKEN)
    if read_token:
        monkeypatch.setenv("FINETUNE_MODEL_TOKEN", read_token)
    else:
        monkeypatch.delenv("FINETUNE_MODEL_TOKEN", raising=False)
    job = make_job(guarded_hub.endpoint, repo="test-org/guarded-out")
    job.spec.model.source = "hf://test-org/guarded-base"
    result = push_to_hub(job, artifact, SCORES, "adapter", QUICK)

    # The card's license came from the base model's card, read with the model's token (or,
    # with none, the push token, as before read tokens existed); the push, with the push token
    # alone (a read token would have been refused with 403).
    assert _users(guarded_hub, "test-org/guarded-base") == {
        "model-reader" if read_token else "pusher"
    }
    assert _users(guarded_hub, "test-org/guarded-out") == {"pusher"}
    readme = guarded_hub.store.resolve(
        guarded_hub.store.get("model", "test-org/guarded-out"), result.revision
    )["files"]["README.md"]
    card = guarded_hub.store.blob_path(readme["sha256"]).read_text()
    assert "license: mit" in card
    out, err = capfd.readouterr()
    logs = "\n".join(hf_env.records)  # type: ignore[attr-defined]
    for text in (logs, out, err, repr(result)):
        assert PUSH_TOKEN not in text and MODEL_READ_TOKEN not in text


@pytest.mark.parametrize(
    ("env", "model", "dataset"),
    [
        ({}, None, None),
        ({"HF_TOKEN": "push"}, "push", "push"),  # the push token reads too, as before
        ({"HF_TOKEN": "push", "FINETUNE_MODEL_TOKEN": "m"}, "m", "push"),
        ({"FINETUNE_DATASET_TOKEN": "d"}, None, "d"),
        (
            {"HF_TOKEN": "push", "FINETUNE_MODEL_TOKEN": "m", "FINETUNE_DATASET_TOKEN": "d"},
            "m",
            "d",
        ),
    ],
)
def test_each_source_reads_with_its_own_token_else_the_push_token(
    env: dict[str, str], model: str | None, dataset: str | None
) -> None:
    from finetune_trainer.sources import read_token

    assert (read_token("model", env), read_token("dataset", env)) == (model, dataset)


def test_downloading_makes_the_source_token_hf_token_meanwhile() -> None:
    """Inside, HF_TOKEN is the source's token (transformers sends HF_TOKEN on some calls of its
    own); outside, the push token again, also when the download fails."""
    from finetune_trainer.sources import SourceNotFound, downloading

    env = {"HF_TOKEN": "push", "FINETUNE_DATASET_TOKEN": "d"}
    with downloading("dataset", "org/data", env=env) as token:
        assert token == env["HF_TOKEN"] == "d"
    assert env["HF_TOKEN"] == "push"
    with downloading("model", "org/base", env=env) as token:  # no read token: the push token
        assert token == env["HF_TOKEN"] == "push"
    from datasets.exceptions import DatasetNotFoundError

    with pytest.raises(SourceNotFound), downloading("dataset", "org/gone", env=env):
        raise DatasetNotFoundError("org/gone does not exist")
    assert env == {"HF_TOKEN": "push", "FINETUNE_DATASET_TOKEN": "d"}
    anonymous: dict[str, str] = {"FINETUNE_MODEL_TOKEN": "m"}
    with downloading("model", "org/base", env=anonymous):
        assert anonymous["HF_TOKEN"] == "m"
    assert "HF_TOKEN" not in anonymous  # unset before, unset after
