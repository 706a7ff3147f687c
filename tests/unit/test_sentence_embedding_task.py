"""sentence-embedding: its schema rules, its HumanEval pairs, and its task module on a tiny
BERT sentence-transformers model (the step loss against sentence-transformers' own loss, the
evaluators' scores, and the saved artifact reloading as the trained model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from finetune_api import ManifestError, parse_manifest
from finetune_api.metrics import DEFAULT_METRICS, metrics_of
from finetune_api.v1alpha1 import SENTENCE_EMBEDDING
from finetune_trainer.example_data import (
    docstring_query,
    humaneval_pairs,
    write_code_search_splits,
)
from finetune_trainer.tasks import TaskData, task_for
from finetune_trainer.testing.embedding import save_tiny_bert
from finetune_trainer.testing.gradients import assert_same_gradients


def _doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": "file:///models/minilm", "task": SENTENCE_EMBEDDING},
        "dataset": {"source": "file:///data/pairs.jsonl"},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value}
    return {"metadata": {"name": "unit"}, "spec": base}


# Matryoshka sizes, in no particular order: the spec keeps them as written.
MATRYOSHKA = {"training": {"matryoshkaDims": [16, 64]}}
SCORED = {"dataset": {"scoreField": "similarity"}}
CACHED = {"training": {"batchSizePerDevice": 8, "cachedMiniBatchSize": 2}}


def _errors(doc: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc)
    return str(caught.value)


# ---- schema -----------------------------------------------------------------------------------


def test_sentence_embedding_defaults_follow_sentence_transformers_columns() -> None:
    spec = parse_manifest(_doc()).spec
    assert (spec.dataset.anchor_field, spec.dataset.positive_field) == ("anchor", "positive")
    assert spec.dataset.negative_field is None
    assert task_for(spec).metrics == DEFAULT_METRICS[SENTENCE_EMBEDDING]
    assert set(DEFAULT_METRICS[SENTENCE_EMBEDDING]) <= set(metrics_of(SENTENCE_EMBEDDING))


def test_gates_on_the_evaluator_keys_are_accepted() -> None:
    doc = _doc(evaluation={"gates": {"cosine_ndcg@10": 0.5, "cosine_accuracy@1": 0.3}})
    assert parse_manifest(doc).spec.evaluation.gates["cosine_ndcg@10"] == 0.5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": {"negativeField": "hard"}, "model": {"task": "causal-lm"}}, "negativeField"),
        ({"dataset": {"anchorField": "q", "positiveField": "q"}}, "different columns"),
        ({"dataset": {"negativeField": "positive"}}, "different columns"),
        ({"evaluation": {"metrics": ["accuracy"]}}, "sentence-embedding computes only"),
        # Not a key of sentence-transformers' evaluators: it would be no score at all.
        ({"evaluation": {"metrics": ["cosine_ndcg@5"]}}, "sentence-embedding computes only"),
        ({"evaluation": {"metrics": ["dim_64_cosine_ndcg@10"]}}, "dim_<d>_<name>"),
        (
            {"evaluation": {"metrics": ["dim_32_cosine_ndcg@10"]}, **MATRYOSHKA},
            "dim_<d>_<name>",
        ),
        ({"evaluation": {"gates": {"dim_32_cosine_ndcg@10": 0.5}}, **MATRYOSHKA}, "computed"),
        ({"training": {"matryoshkaDims": [64, 16, 64]}}, "each size once"),
        ({"training": {"matryoshkaDims": [0]}}, "matryoshkaDims"),
        ({**MATRYOSHKA, "model": {"task": "causal-lm"}}, "only for model.task sentence-embedding"),
        # Scored pairs: a score column of their own, no negatives, scored by spearman_cosine.
        ({**SCORED, "model": {"task": "causal-lm"}}, "only for model.task sentence-embedding"),
        ({"dataset": {"scoreField": "positive"}}, "a column of its own"),
        ({"dataset": {"scoreField": "s", "negativeField": "n"}}, "not with negativeField"),
        ({**SCORED, "evaluation": {"metrics": ["cosine_ndcg@10"]}}, "of scored pairs"),
        ({**SCORED, "evaluation": {"gates": {"cosine_ndcg@10": 0.5}}}, "computed metric"),
        (
            {"evaluation": {"metrics": ["cosine_ndcg@10"]}, "model": {"task": "causal-lm"}},
            "another",
        ),
        ({"evaluation": {"gates": {"spearman_cosine": 0.5}}}, "computed metric"),
        # GradCache: mini-batches of a larger batch, of MultipleNegativesRankingLoss only.
        ({**CACHED, "model": {"task": "causal-lm"}}, "only for model.task sentence-embedding"),
        ({"training": {"batchSizePerDevice": 4, "cachedMiniBatchSize": 4}}, "smaller than"),
        ({**CACHED, **SCORED}, "CoSENTLoss, which sentence-transformers does not cache"),
    ],
)
def test_sentence_embedding_rules(changes: dict[str, Any], message: str) -> None:
    assert message in _errors(_doc(**changes))


def test_scored_pairs_are_scored_by_spearman_at_each_matryoshka_size() -> None:
    doc = _doc(
        dataset=SCORED["dataset"],
        training={"matryoshkaDims": [32]},
        evaluation={"gates": {"dim_32_spearman_cosine": 0.5}},
    )
    spec = parse_manifest(doc).spec
    assert task_for(spec).metrics == ["spearman_cosine", "dim_32_spearman_cosine"]


def test_matryoshka_sizes_are_scored_by_default_and_gated_by_their_keys() -> None:
    doc = _doc(**MATRYOSHKA, evaluation={"gates": {"dim_16_cosine_ndcg@10": 0.5}})
    spec = parse_manifest(doc).spec
    assert spec.training.matryoshka_sizes == (64, 16)
    assert task_for(spec).metrics == [
        *DEFAULT_METRICS[SENTENCE_EMBEDDING],
        "dim_16_cosine_ndcg@10",
        "dim_64_cosine_ndcg@10",
    ]
    listed = {"metrics": ["spearman_cosine", "dim_16_spearman_cosine", "dim_64_cosine_mrr@10"]}
    assert (
        parse_manifest(_doc(**MATRYOSHKA, evaluation=listed)).spec.evaluation.metrics
        == (listed["metrics"])
    )


# ---- the HumanEval pairs ---------------------------------------------------------------------


def test_docstring_query_keeps_the_description_without_examples_or_name() -> None:
    prompt = (
        "import math\n\ndef helper(x):\n    return x\n\n"
        "def add(x: int, y: int) -> int:\n"
        '    """Add two numbers x and y\n    >>> add(2, 3)\n    5\n    """\n'
    )
    assert docstring_query(prompt, "add") == "Add two numbers x and y"


def test_humaneval_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    pairs = humaneval_pairs()
    assert len(pairs) == 164 and all(p["query"] and p["document"] for p in pairs)
    assert write_code_search_splits(tmp_path / "a") == {"train": 131, "test": 33}
    write_code_search_splits(tmp_path / "b")
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{split}.jsonl"
        ).read_bytes()
    ids = {
        split: {json.loads(line)["task_id"] for line in (tmp_path / "a" / f"{split}.jsonl").open()}
        for split in ("train", "test")
    }
    assert not ids["train"] & ids["test"]


# ---- the task module on a tiny BERT -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer: SentenceTransformer(dir) adds mean pooling."""
    return save_tiny_bert(tmp_path_factory.mktemp("emb") / "bert")


def _task_spec(model: Path, **changes: Any) -> Any:
    doc = _doc(
        model={"source": f"file://{model}"},
        training={"maxSeqLength": 32, "seed": 1},
        peft={"r": 4, "alpha": 8, "dropout": 0.0},
        evaluation={"metrics": ["cosine_ndcg@10", "cosine_accuracy@1", "spearman_cosine"]},
    )
    for key, value in changes.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value}
    return parse_manifest(doc).spec


ROWS = {
    "q": ["sum two numbers", "reverse a string", "count vowels", "sort a list"],
    "d": ["return a + b", "return s[::-1]", "return sum(c in 'aeiou' for c in s)", "sorted(x)"],
    "n": ["return a - b", "return s", "return len(s)", "reversed(x)"],
}


def _built(model: Path, negatives: bool) -> tuple[Any, TaskData]:
    fields = {"anchorField": "q", "positiveField": "d"}
    if negatives:
        fields["negativeField"] = "n"
    task = task_for(_task_spec(model, dataset=fields))
    data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
    return task, data


def test_rows_are_renamed_and_text_is_required(tiny_st: Path) -> None:
    _, data = _built(tiny_st, negatives=True)
    assert data.train.column_names == ["anchor", "positive", "negative"]
    assert data.train[0] == {
        "anchor": "sum two numbers",
        "positive": "return a + b",
        "negative": "return a - b",
    }
    task = task_for(_task_spec(tiny_st, dataset={"anchorField": "q", "positiveField": "d"}))
    broken = Dataset.from_dict({"q": ["a", " "], "d": ["b", "c"]})
    with pytest.raises(Exception, match=r"anchorField.*no text"):
        task.build_data(broken, broken)
    # Whatever order the columns come in, the error names the field whose column is empty.
    reordered = Dataset.from_dict({"d": ["b", None], "q": ["a", "c"]})
    with pytest.raises(Exception, match=r"positiveField.*no text in column 'd'"):
        task.build_data(reordered, reordered)


def test_collate_embeds_every_column_in_one_batch(tiny_st: Path) -> None:
    _, data = _built(tiny_st, negatives=True)
    rows = [data.train[i] for i in range(2)]
    batch = data.collate(rows)
    assert batch["input_ids"].shape[0] == 6  # 2 anchors, then 2 positives, then 2 negatives
    tokenizer = data.processor
    assert tokenizer.decode(batch["input_ids"][2], skip_special_tokens=True) == "return a + b"


def test_loss_equals_sentence_transformers_own_and_training_lowers_it(tiny_st: Path) -> None:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    task, data = _built(tiny_st, negatives=True)
    model = task.load_model(data, torch.device("cpu"))
    assert 0 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 20_000
    rows = [data.train[i] for i in range(4)]
    batch = data.collate(rows)
    model.eval()  # no dropout: the two losses see the same embeddings
    ours = task.loss(model, batch)
    columns = [
        {k: v for k, v in model.preprocess([r[c] for r in rows]).items() if torch.is_tensor(v)}
        for c in ("anchor", "positive", "negative")
    ]
    theirs = MultipleNegativesRankingLoss(model)(columns, labels=None)
    assert torch.allclose(ours, theirs, atol=1e-5)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    first = float(task.loss(model, batch).detach())
    for _ in range(15):
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(task.loss(model, batch).detach()) < first


def test_matryoshka_loss_equals_sentence_transformers_own(tiny_st: Path) -> None:
    from sentence_transformers.sentence_transformer.losses import (
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    fields = {"anchorField": "q", "positiveField": "d", "negativeField": "n"}
    sizes = [8, 32, 16]  # the tiny BERT's embedding has 32
    task = task_for(_task_spec(tiny_st, dataset=fields, training={"matryoshkaDims": sizes}))
    data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
    model = task.load_model(data, torch.device("cpu"))
    rows = [data.train[i] for i in range(4)]
    batch = data.collate(rows)
    model.eval()
    columns = [
        {k: v for k, v in model.preprocess([r[c] for r in rows]).items() if torch.is_tensor(v)}
        for c in ("anchor", "positive", "negative")
    ]
    plain = MultipleNegativesRankingLoss(model)
    theirs = MatryoshkaLoss(model, plain, sizes)(columns, labels=None)
    ours = task.loss(model, batch)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # Not the whole embedding's loss three times: the smaller sizes score differently.
    assert not torch.allclose(ours, 3 * plain(columns, labels=None), atol=1e-3)


SCORED_ROWS = {
    "q": ["sum two numbers", "reverse a string", "count vowels", "sort a list"],
    "d": ["return a + b", "return a - b", "return len(s)", "sorted(x)"],
    "s": [1.0, 0.4, 0.2, 0.9],
}


def _scored(tiny_st: Path, sizes: list[int] | None = None) -> tuple[Any, TaskData]:
    fields = {"anchorField": "q", "positiveField": "d", "scoreField": "s"}
    changes: dict[str, Any] = {"evaluation": {"metrics": ["spearman_cosine"]}}
    if sizes:
        changes["training"] = {"matryoshkaDims": sizes}
    task = task_for(_task_spec(tiny_st, dataset=fields, **changes))
    rows = Dataset.from_dict(SCORED_ROWS)
    return task, task.build_data(rows, rows)


@pytest.mark.parametrize("sizes", [None, [32, 8]])
def test_scored_pairs_train_with_sentence_transformers_cosent_loss(
    tiny_st: Path, sizes: list[int] | None
) -> None:
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MatryoshkaLoss

    task, data = _scored(tiny_st, sizes)
    model = task.load_model(data, torch.device("cpu"))
    rows = [data.train[i] for i in range(4)]
    batch = data.collate(rows)
    assert batch["labels"].tolist() == pytest.approx(SCORED_ROWS["s"])
    assert batch["input_ids"].shape[0] == 8  # the anchors, then their pairs' texts
    model.eval()
    columns = [
        {k: v for k, v in model.preprocess([r[c] for r in rows]).items() if torch.is_tensor(v)}
        for c in ("anchor", "positive")
    ]
    loss = CoSENTLoss(model)
    theirs = (MatryoshkaLoss(model, loss, sizes) if sizes else loss)(columns, batch["labels"])
    assert torch.allclose(task.loss(model, batch), theirs, atol=1e-5)


def test_scored_pairs_are_checked_scored_by_their_scores_and_named_on_the_card(
    tiny_st: Path,
) -> None:
    from accelerate import Accelerator
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
    )

    task, data = _scored(tiny_st, [32, 8])
    assert data.train.column_names == ["anchor", "positive", "score"]
    model = task.load_model(data, torch.device("cpu"))
    scores = task.evaluate(Accelerator(cpu=True), model, [])
    model.eval()
    theirs = EmbeddingSimilarityEvaluator(
        SCORED_ROWS["q"], SCORED_ROWS["d"], SCORED_ROWS["s"], similarity_fn_names=["cosine"]
    )(model)
    assert scores["spearman_cosine"] == pytest.approx(theirs["spearman_cosine"])
    settings = dict(task.card("adapter", "me/sts").settings)
    assert settings["loss"].startswith("MatryoshkaLoss (32, 8 dimensions) over CoSENTLoss")
    assert settings["columns"] == "q, d, s"
    for bad in (["high", "low", "", "x"], [0.5, 1.5, 0.2, 0.1], [0.5, None, 0.2, 0.1], [True] * 4):
        rows = Dataset.from_dict({**SCORED_ROWS, "s": bad})
        with pytest.raises(Exception, match=r"scoreField.*no score from 0 to 1 in column 's'"):
            task.build_data(rows, rows)


@pytest.mark.parametrize("sizes", [None, [32, 8]])
def test_cached_mini_batches_give_the_whole_batchs_loss_and_gradients(
    tiny_st: Path, sizes: list[int] | None
) -> None:
    """cachedMiniBatchSize (GradCache) changes what is held in memory, never what is learnt: in
    mini-batches of one row, each column of 4 rows is embedded 4 times without gradients and 4
    times again with them, and the loss and every gradient are those of one pass."""
    fields = {"anchorField": "q", "positiveField": "d", "negativeField": "n"}
    rows = Dataset.from_dict(ROWS)
    found = []
    for mini_batch in (None, 1):
        training: dict[str, Any] = {"batchSizePerDevice": 4, "matryoshkaDims": sizes}
        if mini_batch is not None:
            training["cachedMiniBatchSize"] = mini_batch
        task = task_for(_task_spec(tiny_st, dataset=fields, training=training))
        data = task.build_data(rows, rows)
        torch.manual_seed(0)  # LoRA's A matrices
        model = task.load_model(data, torch.device("cpu"))
        model.eval()  # no dropout: one pass and the mini-batches see the same embeddings
        forwards: list[int] = []  # the rows of each forward pass
        model.register_forward_hook(
            lambda _m, _i, out, seen=forwards: seen.append(len(out["input_ids"]))
        )
        loss = task.loss(model, data.collate([data.train[i] for i in range(4)]))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        found.append((float(loss.detach()), grads, forwards))
    (plain, plain_grads, plain_forwards), (cached, cached_grads, cached_forwards) = found
    assert plain_forwards == [12]  # anchors, positives and negatives in one pass
    assert cached_forwards == [1] * 24
    assert cached == pytest.approx(plain, rel=1e-5)
    assert_same_gradients(plain_grads, cached_grads)
    assert any(float(g.abs().sum()) > 0 for g in cached_grads.values())
    settings = dict(task.card("adapter", "me/code").settings)
    assert "CachedMultipleNegativesRankingLoss (GradCache, mini-batches of 1;" in settings["loss"]


def test_a_matryoshka_size_past_the_embedding_fails_naming_the_field(tiny_st: Path) -> None:
    fields = {"anchorField": "q", "positiveField": "d"}
    task = task_for(_task_spec(tiny_st, dataset=fields, training={"matryoshkaDims": [32, 48]}))
    data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
    with pytest.raises(ManifestError, match=r"matryoshkaDims.*48 is larger than.*32 dimensions"):
        task.load_model(data, torch.device("cpu"))


@pytest.mark.parametrize("method", ["lora", "none"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_st: Path, method: str) -> None:
    grads = []
    for checkpointing in (False, True):
        changes = {"training": {"gradientCheckpointing": checkpointing}, "peft": {"method": method}}
        fields = {"anchorField": "q", "positiveField": "d", "negativeField": "n"}
        task = task_for(_task_spec(tiny_st, dataset=fields, **changes))
        data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
        torch.manual_seed(0)  # LoRA's A matrices
        model = task.load_model(data, torch.device("cpu"))
        assert model.transformers_model.is_activation_checkpointing is checkpointing
        model.train()
        torch.manual_seed(1)  # the same dropout in both
        task.loss(model, data.collate([data.train[i] for i in range(4)])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert_same_gradients(plain, checkpointed)
    # The first layer's gradients come back through the recomputed layers above it.
    assert any(float(g.abs().sum()) > 0 for n, g in checkpointed.items() if "layer.0." in n)


def test_bf16_loads_the_lora_base_at_half_the_bytes_and_trains_fp32_weights(
    tiny_st: Path,
) -> None:
    fields = {"anchorField": "q", "positiveField": "d", "negativeField": "n"}
    models = {}
    for precision in ("fp32", "bf16"):
        task = task_for(_task_spec(tiny_st, dataset=fields, training={"precision": precision}))
        data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
        models[precision] = task.load_model(data, torch.device("cpu"))
    fp32, bf16 = models["fp32"], models["bf16"]

    def frozen(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if not p.requires_grad]

    assert {p.dtype for p in frozen(bf16)} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in frozen(bf16)) * 2 == sum(
        p.numel() * p.element_size() for p in frozen(fp32)
    )
    params = [p for p in bf16.parameters() if p.requires_grad]
    assert params and {p.dtype for p in params} == {torch.float32}
    batch = data.collate([data.train[i] for i in range(4)])
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    losses = []
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate's bf16 does
            loss = task.loss(bf16, batch)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_scores_save_and_card(tiny_st: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator
    from sentence_transformers import SentenceTransformer

    task, data = _built(tiny_st, negatives=False)
    model = task.load_model(data, torch.device("cpu"))
    scores = task.evaluate(Accelerator(cpu=True), model, [])
    assert list(scores) == ["cosine_ndcg@10", "cosine_accuracy@1", "spearman_cosine"]
    assert all(-1.0 <= v <= 1.0 for v in scores.values())  # NaN fails too
    assert model.training  # evaluation gives the model back in train mode

    assert task.save(model, data, tmp_path / "out") == "adapter"
    assert {"modules.json", "adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    model.eval()
    text = ["count vowels in a word"]
    reloaded = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert torch.allclose(
        torch.as_tensor(reloaded.encode(text)), torch.as_tensor(model.encode(text)), atol=1e-5
    )
    card = task.card("adapter", "me/code-search")
    assert (card.library_name, card.pipeline_tag) == (
        "sentence-transformers",
        "sentence-similarity",
    )
    assert 'SentenceTransformer("me/code-search")' in card.usage
    assert "truncate_dim" not in card.usage


def test_matryoshka_sizes_are_scored_truncated_and_the_card_says_how_to_load_one(
    tiny_st: Path,
) -> None:
    from accelerate import Accelerator

    metrics = ["cosine_ndcg@10", "dim_32_cosine_ndcg@10", "dim_4_cosine_ndcg@10"]
    metrics += ["spearman_cosine", "dim_4_spearman_cosine"]
    spec = _task_spec(
        tiny_st,
        dataset={"anchorField": "q", "positiveField": "d", "negativeField": "n"},
        training={"matryoshkaDims": [32, 4]},
        evaluation={"metrics": metrics},
    )
    task = task_for(spec)
    data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
    model = task.load_model(data, torch.device("cpu"))
    scores = task.evaluate(Accelerator(cpu=True), model, [])
    assert list(scores) == metrics
    # 32 is the whole embedding; 4 is what the model gives when it is loaded cut to 4.
    assert scores["dim_32_cosine_ndcg@10"] == scores["cosine_ndcg@10"]
    model.truncate_dim = 4
    model.eval()
    cut = task._scores_at(model, {"cosine_ndcg@10", "spearman_cosine"}, None)
    assert scores["dim_4_cosine_ndcg@10"] == pytest.approx(cut["cosine_ndcg@10"])
    assert scores["dim_4_spearman_cosine"] == pytest.approx(cut["spearman_cosine"])
    assert scores["dim_4_spearman_cosine"] != pytest.approx(scores["spearman_cosine"])

    card = task.card("adapter", "me/code-search")
    assert 'SentenceTransformer("me/code-search", truncate_dim=4)' in card.usage
    assert dict(card.settings)["loss"].startswith("MatryoshkaLoss (32, 4 dimensions) over")


def test_full_fine_tune_and_merged_artifacts(tiny_st: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    full = task_for(_task_spec(tiny_st, peft={"method": "none"}))
    data = full.build_data(
        Dataset.from_dict({"anchor": ["a"], "positive": ["b"]}),
        Dataset.from_dict({"anchor": ["a"], "positive": ["b"]}),
    )
    model = full.load_model(data, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("pooler" in n for n in trainable)  # DDP: no unused parameter
    assert full.save(model, data, tmp_path / "full") == "full"
    assert (tmp_path / "full" / "model.safetensors").is_file()

    merged = task_for(
        _task_spec(
            tiny_st,
            output={"hub": {"repo": "me/m", "merge": True, "endpoint": "http://127.0.0.1:1"}},
        )
    )
    data = merged.build_data(
        Dataset.from_dict({"anchor": ["a"], "positive": ["b"]}),
        Dataset.from_dict({"anchor": ["a"], "positive": ["b"]}),
    )
    model = merged.load_model(data, torch.device("cpu"))
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    model.eval()
    text = ["sort a list"]
    expected = torch.as_tensor(model.encode(text))
    assert merged.save(model, data, tmp_path / "merged") == "merged"
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    assert torch.allclose(torch.as_tensor(reloaded.encode(text)), expected, atol=1e-4)


def test_a_dora_trains_the_sentence_transformers_model(tiny_st: Path) -> None:
    fields = {"anchorField": "q", "positiveField": "d", "negativeField": "n"}
    task = task_for(_task_spec(tiny_st, dataset=fields, peft={"useDora": True}))
    data = task.build_data(Dataset.from_dict(ROWS), Dataset.from_dict(ROWS))
    model = task.load_model(data, torch.device("cpu"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trained), trained
    batch = data.collate([data.train[i] for i in range(4)])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    first = float(task.loss(model, batch).detach())
    for _ in range(10):
        task.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(task.loss(model, batch).detach()) < first
