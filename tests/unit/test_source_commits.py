"""Resolving the sources' revisions to commits (finetune_trainer.fetch), against the Hub-API test
double with the real huggingface_hub client in this process. The endpoint is patched into
huggingface_hub's constants (it was fixed when huggingface_hub was first imported), as are offline
mode and Xet. The whole fetch, every rank and pod, is tests/trainer/test_one_download.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_api import FineTuneJob, ManifestError, parse_manifest, pod
from finetune_api.constants import Reason
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_hub_double import HubDouble
from finetune_trainer import fetch
from finetune_trainer.job_folder import no_space
from finetune_trainer.sources import SourceNotFound

MODEL, DATASET = "org/base", "org/text"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubDouble]:
    from huggingface_hub import constants

    with HubDouble(tmp_path / "hub") as double:
        monkeypatch.setattr(constants, "ENDPOINT", double.endpoint)
        template = double.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        for name in ("HF_TOKEN", "FINETUNE_MODEL_TOKEN", "FINETUNE_DATASET_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield double


def _seed(hub: HubDouble, repo: str, text: str, tmp_path: Path, kind: str = "model") -> str:
    folder = tmp_path / f"{kind}-{repo.replace('/', '-')}-{len(text)}"
    folder.mkdir()
    (folder / "README.md").write_text(text)
    return hub.seed(repo, folder, repo_type=kind)


def _spec(**sections: Any) -> FineTuneJobSpec:
    doc: dict[str, Any] = {
        "model": {"source": f"hf://{MODEL}"},
        "dataset": {"source": f"hf://{DATASET}"},
    }
    for name, changes in sections.items():
        doc[name] = {**doc.get(name, {}), **changes}
    return FineTuneJobSpec.model_validate(doc)


def _job(**sections: Any) -> FineTuneJob:
    return parse_manifest(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "pf"},
            "spec": _spec(**sections).model_dump(mode="json", by_alias=True, exclude_none=True),
        }
    )


def test_rank0_resolves_once_and_a_later_attempt_keeps_those_commits(
    hub: HubDouble, tmp_path: Path
) -> None:
    model = _seed(hub, MODEL, "v1", tmp_path)
    data = _seed(hub, DATASET, "d1", tmp_path, "dataset")
    root = tmp_path / "checkpoints" / "job-abc"
    assert fetch.kept_or_resolved(_spec(), root) == fetch.Commits(model, data)
    kept = json.loads((root / fetch.RESOLVED_FILE).read_text())
    assert kept["commits"] == {"model": model, "dataset": data, "vae": None}

    # main moves on; the next attempt on the same store loads what the first loaded, and asks
    # the Hub nothing.
    assert _seed(hub, MODEL, "v2 is longer", tmp_path) != model
    asked = len(hub.requests)
    assert fetch.kept_or_resolved(_spec(), root) == fetch.Commits(model, data)
    assert len(hub.requests) == asked

    # Another job's folder (or a lost one) resolves again, to the new head.
    fresh = fetch.kept_or_resolved(_spec(), tmp_path / "other")
    assert fresh.model not in (None, model) and fresh.dataset == data
    # So does a kept file that does not parse, or names other repos.
    (root / fetch.RESOLVED_FILE).write_text("{not json")
    assert fetch.kept_or_resolved(_spec(), root).model == fresh.model
    other = _seed(hub, "org/other", "o", tmp_path)
    moved = _spec(model={"source": "hf://org/other"})
    assert fetch.kept_or_resolved(moved, root).model == other


def test_sources_the_cache_cannot_hold_are_refused_before_any_download(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's /tmp cache holds template.cacheSize, past which the kubelet evicts the pod: the
    job fails at once, as the field, instead of after the download filled it."""
    from huggingface_hub import constants

    monkeypatch.setenv(pod.CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "tmp" / "hub"))
    _seed(hub, MODEL, "m" * 30_000, tmp_path)  # and a small .gitattributes
    _seed(hub, DATASET, "d" * 20_000, tmp_path, "dataset")

    def spec(cache_size: str) -> FineTuneJobSpec:
        doc = _spec().model_dump(mode="json", by_alias=True, exclude_none=True)
        return FineTuneJobSpec.model_validate({**doc, "template": {"cacheSize": cache_size}})

    with pytest.raises(ManifestError) as refused:
        fetch.kept_or_resolved(spec("40Ki"), tmp_path / "checkpoints" / "job")
    [error] = refused.value.errors
    assert error.path == "spec.template.cacheSize"
    said = re.search(
        rf"the model {MODEL} \((\S+)Ki\) and the dataset {DATASET} \((\S+)Ki\) in .*: make "
        r"template.cacheSize larger than they take, (\S+)Ki \(template.cacheSize is 40Ki\)$",
        error.message,
    )
    assert said is not None, error.message
    model_ki, data_ki, total_ki = map(float, said.groups())
    assert 29.3 < model_ki < 33 and 19.5 < data_ki < 23 and total_ki >= model_ki + data_ki - 0.1
    assert not [p for m, p, _ in hub.requests if "/resolve/" in p]  # nothing downloaded
    assert not (tmp_path / "checkpoints" / "job" / fetch.RESOLVED_FILE).exists()
    commits = fetch.kept_or_resolved(spec("64Ki"), tmp_path / "checkpoints" / "job")
    # A snapshot already whole in the cache takes no more room.
    for snap in fetch.snapshots(spec("64Ki"), commits):
        fetch.download(snap)
    assert fetch.kept_or_resolved(spec("1Ki"), tmp_path / "checkpoints" / "other") == commits
    # On the checkpoint claim, the claim's free space is the room (here, this machine's disk).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "checkpoints" / "hub-cache"))
    assert fetch.kept_or_resolved(spec("1Ki"), tmp_path / "checkpoints" / "third") == commits


def test_a_revision_is_resolved_to_its_commit_and_a_missing_one_is_not_found(
    hub: HubDouble, tmp_path: Path
) -> None:
    first = _seed(hub, MODEL, "v1", tmp_path)
    _seed(hub, MODEL, "v2 is longer", tmp_path)
    _seed(hub, DATASET, "d1", tmp_path, "dataset")
    # A commit names itself; main its head.
    pinned = fetch.resolve(_spec(model={"revision": first}))
    assert pinned.model == first
    assert fetch.resolve(_spec()).model != first
    with pytest.raises(SourceNotFound) as err:
        fetch.resolve(_spec(dataset={"revision": "no-such-branch"}))
    assert err.value.reason == Reason.DATASET_NOT_FOUND
    assert "no-such-branch" in str(err.value) and hub.endpoint in str(err.value)


def test_a_vae_of_its_own_is_resolved_fetched_read_with_the_model_token_and_kept(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """text-to-image's model.vae: a model repo of its own, a third source beside the model and
    the dataset, read with the model's token (the dataset's is another)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_fetched", {})  # what fetch_sources records, for this test only
    read, other = "hf_modelreadtoken0123456789abcdef", "hf_datareadtoken0123456789abcdefg"
    hub.read_tokens.update({read: "model-reader", other: "data-reader"})
    vae_repo = "org/vae-fp16-fix"
    _seed(hub, MODEL, "m", tmp_path)
    _seed(hub, DATASET, "d", tmp_path, "dataset")
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 64)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"b" * 64)  # safetensors shadow it
    vae = hub.seed(vae_repo, folder)
    hub.require_auth_for_read = True  # so every request says whose token it carried
    monkeypatch.setenv(pod.MODEL_TOKEN_ENV, read)
    monkeypatch.setenv(pod.DATASET_TOKEN_ENV, other)
    spec = _spec(model={"task": "text-to-image", "vae": {"source": f"hf://{vae_repo}"}})
    root = tmp_path / "checkpoints" / "job"
    commits = fetch.kept_or_resolved(spec, root)
    assert commits.vae == vae and commits.model is not None
    assert json.loads((root / fetch.RESOLVED_FILE).read_text())["commits"]["vae"] == vae
    [snap] = [s for s in fetch.snapshots(spec, commits) if s.kind == "vae"]
    folder = fetch.download(snap)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".gitattributes",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    asked = [(p, t) for m, p, t in hub.requests if vae_repo in p]
    assert asked and {user for _, user in asked} == {"model-reader"}
    # The loaders then read that commit from the cache.
    fetch.fetch_sources(spec, root, fetch.Alone())
    assert fetch.revision_to_load("vae", f"hf://{vae_repo}", None) == vae
    # A VAE the endpoint does not have is the field that names it.
    gone = _spec(model={"task": "text-to-image", "vae": {"source": "hf://org/no-such-vae"}})
    with pytest.raises(SourceNotFound) as err:
        fetch.resolve(gone)
    assert (err.value.reason, err.value.field) == (Reason.MODEL_NOT_FOUND, "spec.model.vae.source")


def test_file_sources_have_no_commit_and_load_as_the_spec_says(tmp_path: Path) -> None:
    spec = _spec(
        model={"source": "file:///models/base", "revision": "main"},
        dataset={"source": "file:///data/x.jsonl"},
    )
    assert fetch.resolve(spec) == fetch.NO_COMMITS
    assert fetch.revision_to_load("model", spec.model.source, spec.model.revision) is None
    # An hf:// source this process has not fetched loads at the spec's revision.
    assert fetch.revision_to_load("dataset", "hf://org/text", "v1") == "v1"
    assert fetch.pinned("dataset", "hf://org/text") is None


def test_only_rank_0s_pod_prefetches_and_only_what_rank_0_will_fetch(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune_trainer.prefetch runs where rank 0 is about to download: an hf:// source, the
    Hub online, and no final artifact that an earlier attempt kept (that one is pushed without
    the sources being loaded)."""
    from huggingface_hub import constants

    from finetune_trainer.job_folder import COMPLETE_MARKER, FINAL_FOLDER, checkpoint_root
    from finetune_trainer.prefetch import wanted

    monkeypatch.setenv(pod.CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    job = _job()
    assert wanted(job, node_rank=0)
    assert not wanted(job, node_rank=1)  # the other pods get rank 0's copy (spread)
    local = {"source": "file:///models/base"}
    assert not wanted(_job(model=local, dataset={"source": "file:///d.jsonl"}), node_rank=0)

    final = checkpoint_root(job) / FINAL_FOLDER
    final.mkdir(parents=True)
    assert wanted(job, node_rank=0)  # a save cut short: rank 0 trains, and so fetches
    (final / COMPLETE_MARKER).write_text("")
    assert not wanted(job, node_rank=0)

    (final / COMPLETE_MARKER).unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not wanted(job, node_rank=0)


def test_the_prefetch_resolves_first_then_downloads_and_leaves_a_failure_to_rank_0(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefetch is forked (from this test's process, as `finetune train` forks it before it
    imports torch): the pipe closes once the revisions are kept, and the snapshots then become
    whole in the hub cache, each file fetched once."""
    from huggingface_hub import constants

    from finetune_trainer.job_folder import checkpoint_root
    from finetune_trainer.prefetch import Prefetch

    monkeypatch.setenv(pod.CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = _seed(hub, MODEL, "v1", tmp_path)
    data = _seed(hub, DATASET, "d1", tmp_path, "dataset")
    job = _job()
    prefetch = Prefetch.start(job, node_rank=0)
    try:
        prefetch.wait_resolved()
        kept = json.loads((checkpoint_root(job) / fetch.RESOLVED_FILE).read_text())
        assert kept["commits"] == {"model": model, "dataset": data, "vae": None}
        snaps = fetch.snapshots(job.spec, fetch.Commits(model, data))
        deadline = time.monotonic() + 60
        while not all(s.is_complete() for s in snaps) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        prefetch.stop()
    assert all((s.folder / "README.md").is_file() for s in snaps)
    gets = [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
    assert len(gets) == len(set(gets)), gets
    assert {
        f"/{MODEL}/resolve/{model}/README.md",
        f"/datasets/{DATASET}/resolve/{data}/README.md",
    } <= set(gets)
    lookups = [
        p for m, p, _ in hub.requests if p in (f"/api/models/{MODEL}", f"/api/datasets/{DATASET}")
    ]
    assert len(lookups) == 2, lookups

    # A dataset that does not exist: the pipe closes all the same, nothing is kept, and rank 0
    # meets the error when it fetches.
    missing = _job(dataset={"source": "hf://org/no-such-data"})
    prefetch = Prefetch.start(missing, node_rank=0)
    prefetch.wait_resolved()
    prefetch.stop()
    assert not (checkpoint_root(missing) / fetch.RESOLVED_FILE).exists()


def test_under_fsdp_a_rank_other_than_0_reads_and_fetches_the_model_without_its_weights(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "weighty"
    (folder / "sub").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "sub/extra.bin"):
        (folder / name).write_text(name)
    model, data = hub.seed(MODEL, folder), _seed(hub, DATASET, "d1", tmp_path, "dataset")
    commits = fetch.Commits(model, data)
    fsdp = _spec(training={"strategy": "fsdp"})
    for spec, rank_0, weights in ((_spec(), False, True), (fsdp, True, True), (fsdp, False, False)):
        snaps = {s.kind: s.weights for s in fetch.snapshots(spec, commits, rank_0=rank_0)}
        assert snaps == {"model": weights, "dataset": True}, (spec.training.strategy, rank_0)

    light = fetch.Snapshot("model", MODEL, model, weights=False)
    whole = fetch.Snapshot("model", MODEL, model)
    fetch.download(light)
    got = {p.relative_to(light.folder).as_posix() for p in light.folder.rglob("*")}
    assert got == {".gitattributes", "config.json", "tokenizer.json"}, got
    gets = {p for m, p, _ in hub.requests if m == "GET" and f"/resolve/{model}/" in p}
    assert gets == {f"/{MODEL}/resolve/{model}/{name}" for name in got}, gets
    assert light.is_complete() and not whole.is_complete()
    # A whole copy (rank 0's, on the pod it shares with other ranks) serves both.
    fetch.download(whole)
    assert (whole.folder / "model.safetensors").read_text() == "model.safetensors"
    assert whole.is_complete() and light.is_complete()


def test_a_full_cache_is_the_field_that_sizes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same volume would fill again: a spec error naming what to make larger."""
    monkeypatch.delenv(pod.CHECKPOINT_DIR_ENV, raising=False)
    on_claim = no_space(f"the model {MODEL}", Path(pod.SOURCE_CACHE_DIR))
    assert [e.path for e in on_claim.errors] == ["spec.output.checkpoints.size"]
    assert MODEL in str(on_claim) and "larger" in str(on_claim)
    in_pod = no_space(f"the dataset {DATASET}", Path(pod.HF_HOME) / "hub")
    assert [e.path for e in in_pod.errors] == ["spec.template.cacheSize"]


def test_a_model_is_fetched_without_the_weights_its_loaders_never_read() -> None:
    files = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",  # the same weights again, for old transformers
        "original/consolidated.00.pth",  # Meta's own checkpoint: Llama's weights a second time
        "flax_model.msgpack",
        "onnx/model.onnx",
        "tokenizer.json",
        "1_Pooling/config.json",  # sentence-transformers' modules are kept
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",  # diffusers' variant: not asked for
        "text_encoder/pytorch_model.bin",  # the only weights of that folder: kept
    ]
    assert fetch.model_files_to_fetch(files) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "1_Pooling/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/pytorch_model.bin",
    ]
    # A repo with .bin weights only keeps them.
    assert fetch.model_files_to_fetch(["config.json", "pytorch_model.bin"]) == [
        "config.json",
        "pytorch_model.bin",
    ]


def test_a_pipeline_is_fetched_as_its_model_index_names_its_parts() -> None:
    """The layout of stabilityai/stable-diffusion-xl-base-1.0: the parts' folders, and beside
    them what from_pretrained never reads, 14 GB of single-file checkpoints and a second VAE."""
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0",
        "force_zeros_for_empty_prompt": True,
        **{part: ["diffusers", "AutoencoderKL"] for part in ("unet", "vae", "scheduler")},
        **{part: ["transformers", "CLIPTextModel"] for part in ("text_encoder", "text_encoder_2")},
        **{part: ["transformers", "CLIPTokenizer"] for part in ("tokenizer", "tokenizer_2")},
    }
    parts = fetch.pipeline_parts(index)
    assert parts == {"unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                     "tokenizer_2"}  # fmt: skip
    read = [
        ".gitattributes",
        "LICENSE.md",
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer_2/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    never_read = [
        "sd_xl_base_1.0.safetensors",  # the whole pipeline again, as one file
        "sd_xl_base_1.0_0.9vae.safetensors",
        "sd_xl_offset_example-lora_1.0.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/openvino_model.bin",
        "vae_1_0/diffusion_pytorch_model.safetensors",  # a folder model_index does not name
        "vae_decoder/model.onnx",
    ]
    assert fetch.model_files_to_fetch(sorted(read + never_read), parts) == sorted(read)
    # Stable Diffusion 1.5's root: the same weights four times over, as .ckpt and .safetensors.
    root = ["v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "model_index.json"]
    assert fetch.model_files_to_fetch(root, {"unet"}) == ["model_index.json"]
