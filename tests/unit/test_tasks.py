"""The task modules: one per `model.task` of the schema, and each one's pure parts on a tiny
random Llama (data building, the step loss, scores, the model and the card's metadata)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from datasets import Dataset

from finetune_api import parse_manifest
from finetune_api.metrics import (
    BUILTIN_METRICS,
    CLASSIFICATION_METRICS,
    DEFAULT_METRICS,
    builtin_metric,
    display_name,
    foreign_metrics,
    lower_is_better,
    metrics_of,
    split_truncated,
    truncated,
)
from finetune_api.v1alpha1 import FineTuneJobSpec, Task
from finetune_trainer.tasks import REGISTRY, TaskData, task_class, task_for
from finetune_trainer.tasks import Task as TaskModule
from finetune_trainer.tasks.causal_lm import IGNORE_INDEX, CausalLM, token_nll
from finetune_trainer.tasks.sequence_classification import SequenceClassification
from finetune_trainer.testing.tiny import save_tiny_model, sentences


def test_every_task_of_the_schema_has_a_registered_module() -> None:
    assert set(REGISTRY) == set(get_args(Task))
    for name in get_args(Task):
        cls = task_class(name)
        assert issubclass(cls, TaskModule) and cls.name == name
    with pytest.raises(KeyError, match="no task module"):
        task_class("no-such-task")


def test_registry_and_scoring_import_no_torch() -> None:
    # A task's libraries load with its module, when a job runs it: not with the registry.
    code = (
        "import sys, finetune_trainer.tasks, finetune_trainer.scoring; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_metric_vocabulary_speaks_of_the_schema_tasks() -> None:
    tasks = set(get_args(Task))
    assert set(DEFAULT_METRICS) == tasks
    assert all(set(m.tasks) <= tasks for m in BUILTIN_METRICS)
    for task, defaults in DEFAULT_METRICS.items():
        assert set(defaults) <= set(metrics_of(task))
        assert not set(metrics_of(task)) & set(foreign_metrics(task))
    # A gate on one of these is a maximum, not a minimum.
    lower = {m.name for m in BUILTIN_METRICS if lower_is_better(m.name)}
    assert lower == {"perplexity", "loss", "denoising_loss"}
    # The CRD's CEL rule lists these, in this order: changing it changes the CRD.
    assert CLASSIFICATION_METRICS == ("accuracy", "f1", "precision", "recall")


def test_a_score_at_a_matryoshka_size_reads_as_its_score_at_that_size() -> None:
    name = truncated(64, "cosine_ndcg@10")
    assert name == "dim_64_cosine_ndcg@10"  # sentence-transformers' key for name="dim_64"
    assert split_truncated(name) == (64, "cosine_ndcg@10")
    assert split_truncated("cosine_ndcg@10") == (None, "cosine_ndcg@10")
    assert split_truncated("dim_0_cosine_ndcg@10") == (None, "dim_0_cosine_ndcg@10")
    assert display_name(name) == "NDCG@10 (64 dims)"
    found = builtin_metric(name)
    assert found is not None and found.name == name
    assert found.description.endswith("cut to its first 64 dimensions")
    assert not lower_is_better(name) and lower_is_better("perplexity")
    # A size of a name that is no score of its own is a Hub metric's name, as it is.
    assert builtin_metric("dim_64_bleu2") is None and display_name("dim_64_bleu2") == "dim_64_bleu2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(
        tmp_path_factory.mktemp("tasks") / "llama",
        sentences(200, 0),
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        layers=1,
        heads=2,
        max_positions=64,
    )


def _spec(model_dir: Path, **changes: Any) -> FineTuneJobSpec:
    spec: dict[str, Any] = {
        "model": {"source": f"file://{model_dir}"},
        "dataset": {"source": "file:///unused.jsonl"},
        "peft": {"r": 2, "alpha": 4, "dropout": 0.0},
        "training": {"maxSeqLength": 16, "seed": 3},
    }
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value}
    return parse_manifest({"metadata": {"name": "unit"}, "spec": spec}).spec


def _single_process() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_a_task_serves_only_its_own_spec(model_dir: Path) -> None:
    spec = _spec(model_dir)
    assert isinstance(task_for(spec), CausalLM)
    with pytest.raises(ValueError, match="sequence-classification"):
        SequenceClassification(spec)


# ---- causal-lm -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal(model_dir: Path) -> tuple[CausalLM, TaskData]:
    task = CausalLM(_spec(model_dir, evaluation={"metrics": ["perplexity", "loss"]}))
    train = Dataset.from_dict({"text": sentences(30, 1)})
    evaluation = Dataset.from_dict({"text": sentences(7, 2)})
    return task, task.build_data(train, evaluation)


def test_causal_data_packs_training_blocks_and_keeps_every_eval_token(
    causal: tuple[CausalLM, TaskData],
) -> None:
    _, data = causal
    assert {len(ids) for ids in data.train["input_ids"]} == {16}
    # Evaluation keeps the short tail: every token of every eval sentence is in a block.
    tokenizer = data.processor
    expected = sum(
        len(tokenizer(t)["input_ids"]) + 1  # + the eos that ends each document
        for t in sentences(7, 2)
    )
    assert sum(len(ids) for ids in data.evaluation["input_ids"]) == expected
    assert len(data.evaluation["input_ids"][-1]) <= 16
    assert data.labels is None


def test_causal_collate_leaves_padding_unscored(causal: tuple[CausalLM, TaskData]) -> None:
    _, data = causal
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = data.collate(rows)
    pad = data.processor.pad_token_id
    assert batch["input_ids"][1].tolist() == [8, pad, pad]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"][1].tolist() == [8, IGNORE_INDEX, IGNORE_INDEX]


def test_causal_model_loss_and_scores_agree(causal: tuple[CausalLM, TaskData]) -> None:
    task, data = causal
    model = task.load_model(data, torch.device("cpu"))
    assert model.peft_config["default"].task_type == "CAUSAL_LM"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    model.eval()
    batch = data.collate([data.train[i] for i in range(4)])  # packed: no padding
    with torch.no_grad():
        loss = float(task.loss(model, batch))
        logits = model(input_ids=batch["input_ids"]).logits
    nll, tokens = token_nll(logits, batch["labels"])
    assert loss == pytest.approx(float(nll.sum() / tokens.sum()), rel=1e-5)
    assert int(tokens.sum()) == 4 * 15  # each block predicts all but its first token

    scores = task.evaluate(_single_process(), model, [batch])
    assert set(scores) == {"perplexity", "loss"}
    assert scores["loss"] == pytest.approx(loss, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-6)
    assert model.training  # evaluation hands the model back in train mode


def test_causal_card_metadata(model_dir: Path) -> None:
    task = CausalLM(_spec(model_dir, training={"packing": False}))
    card = task.card("adapter", "org/repo")
    assert (card.pipeline_tag, card.task_name) == ("text-generation", "Text Generation")
    assert card.library_name == "peft"
    assert ("Packing", False) in card.settings
    assert 'PeftModel.from_pretrained(base, "org/repo")' in card.usage
    assert "<base model>" in card.usage  # a file:// base has no Hub id to name
    merged = task.card("merged", "org/repo")
    assert merged.library_name == "transformers"
    assert 'AutoModelForCausalLM.from_pretrained("org/repo")' in merged.usage


# ---- sequence-classification -----------------------------------------------------------------


def _classification_rows(n: int, seed: int) -> Dataset:
    texts = sentences(n, seed)
    # A learnable rule, with string labels: which colour word the sentence has, if any.
    labels = ["red" if "red" in t else "blue" if "blue" in t else "other" for t in texts]
    return Dataset.from_dict({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def classification(model_dir: Path) -> tuple[SequenceClassification, TaskData]:
    spec = _spec(
        model_dir,
        model={"task": "sequence-classification", "numLabels": 4},
        evaluation={"metrics": ["accuracy", "f1", "loss"]},
    )
    task = SequenceClassification(spec)
    return task, task.build_data(_classification_rows(40, 4), _classification_rows(12, 5))


def test_classification_data_maps_string_labels_in_sorted_order(
    classification: tuple[SequenceClassification, TaskData],
) -> None:
    _, data = classification
    assert data.labels == ["blue", "other", "red", "unused_3"]
    rows = _classification_rows(40, 4)
    assert data.train["labels"] == [data.labels.index(y) for y in rows["label"]]
    assert max(len(ids) for ids in data.train["input_ids"]) <= 16  # truncated to maxSeqLength
    batch = data.collate([data.train[i] for i in range(3)])
    assert batch["labels"].shape == (3,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_classification_model_loss_and_scores(
    classification: tuple[SequenceClassification, TaskData],
) -> None:
    task, data = classification
    model = task.load_model(data, torch.device("cpu"))
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    assert model.config.id2label == dict(enumerate(data.labels or []))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # the new head trains in full

    model.eval()
    batch = data.collate([data.evaluation[i] for i in range(len(data.evaluation))])
    with torch.no_grad():
        loss = float(task.loss(model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert loss == pytest.approx(float(expected), rel=1e-5)

    scores = task.evaluate(_single_process(), model, [batch])
    assert set(scores) == {"accuracy", "f1", "loss"}
    hits = (logits.argmax(-1) == batch["labels"]).float().mean()
    assert scores["accuracy"] == pytest.approx(float(hits))
    assert scores["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0.0 <= scores["f1"] <= 1.0


def test_classification_card_metadata(
    classification: tuple[SequenceClassification, TaskData],
) -> None:
    task, _ = classification
    card = task.card("full", "org/clf")
    assert (card.pipeline_tag, card.task_name) == ("text-classification", "Text Classification")
    assert card.library_name == "transformers"
    assert card.settings == ()  # packing is a causal-lm setting
    assert 'AutoModelForSequenceClassification.from_pretrained("org/clf")' in card.usage


def test_classification_saves_the_adapter_with_its_head_and_tokenizer(
    classification: tuple[SequenceClassification, TaskData], tmp_path: Path
) -> None:
    task, data = classification
    model = task.load_model(data, torch.device("cpu"))
    assert task.save(model, data, tmp_path) == "adapter"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert "score" in config["modules_to_save"]
    assert (tmp_path / "tokenizer.json").is_file()
