"""Resolving the sources' revisions to commits (finetune_trainer.fetch), against the Hub-API test
double with the real huggingface_hub client in this process. The endpoint is patched into
huggingface_hub's constants (it was fixed when huggingface_hub was first imported), as are offline
mode and Xet. The whole fetch, every rank and pod, is tests/trainer/test_one_download.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_api import pod
from finetune_api.constants import Reason
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_hub_double import HubDouble
from finetune_trainer import fetch
from finetune_trainer.sources import SourceNotFound

MODEL, DATASET = "org/base", "org/text"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubDouble]:
    from huggingface_hub import constants

    with HubDouble(tmp_path / "hub") as double:
        monkeypatch.setattr(constants, "ENDPOINT", double.endpoint)
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
        doc[name] = {**doc[name], **changes}
    return FineTuneJobSpec.model_validate(doc)


def test_rank0_resolves_once_and_a_later_attempt_keeps_those_commits(
    hub: HubDouble, tmp_path: Path
) -> None:
    model = _seed(hub, MODEL, "v1", tmp_path)
    data = _seed(hub, DATASET, "d1", tmp_path, "dataset")
    root = tmp_path / "checkpoints" / "job-abc"
    assert fetch.kept_or_resolved(_spec(), root) == fetch.Commits(model, data)
    kept = json.loads((root / fetch.RESOLVED_FILE).read_text())
    assert kept["commits"] == {"model": model, "dataset": data}

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


def test_a_full_cache_is_the_field_that_sizes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same volume would fill again: a spec error naming what to make larger."""
    monkeypatch.delenv(pod.CHECKPOINT_DIR_ENV, raising=False)
    on_claim = fetch._too_small("model", MODEL, Path(pod.SOURCE_CACHE_DIR))
    assert [e.path for e in on_claim.errors] == ["spec.output.checkpoints.size"]
    assert MODEL in str(on_claim) and "larger" in str(on_claim)
    in_pod = fetch._too_small("dataset", DATASET, Path(pod.HF_HOME) / "hub")
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
