"""Built-in scorers (offline evaluate modules), scorer loading and quality gates (no network, no
model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finetune_api.metrics import METRICS, metrics_of
from finetune_api.v1alpha1 import SENTENCE_EMBEDDING, TEXT_TO_IMAGE
from finetune_trainer.scoring import (
    BUILTIN_SCORERS,
    SCORERS_DIR,
    ScorerUnavailable,
    gate_failures,
    load_scorer,
    perplexity,
)

CLASSIFICATION = ("f1", "precision", "recall")


@pytest.fixture(scope="module")
def metrics() -> dict[str, object]:
    return {name: load_scorer(name) for name in BUILTIN_SCORERS}


def test_builtin_modules_ship_in_package() -> None:
    for name in BUILTIN_SCORERS:
        assert (SCORERS_DIR / name / f"{name}.py").is_file()


def test_every_builtin_score_but_loss_has_a_scorer() -> None:
    # `loss` is the model's own, sentence-transformers' evaluators compute the scores of
    # sentence-embedding, and the text-to-image task its denoising loss; every other score of
    # the contract's vocabulary ships a scorer, and no scorer computes a score it does not define.
    by_tasks = set(metrics_of(SENTENCE_EMBEDDING)) | set(metrics_of(TEXT_TO_IMAGE))
    assert set(BUILTIN_SCORERS) == set(METRICS) - {"loss"} - by_tasks
    shipped = {p.name for p in SCORERS_DIR.iterdir() if (p / f"{p.name}.py").is_file()}
    assert shipped == set(BUILTIN_SCORERS)


def test_builtins_load_as_evaluate_modules(metrics: dict) -> None:
    import evaluate

    for name, metric in metrics.items():
        assert isinstance(metric, evaluate.EvaluationModule), name
        assert metric.name == name


def test_accuracy(metrics: dict) -> None:
    acc = metrics["accuracy"]
    assert acc.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2]) == {"accuracy": 0.75}
    assert acc.compute(predictions=[1, 1], references=[1, 0], normalize=False) == {"accuracy": 1.0}


def test_accuracy_accumulates_batches(metrics: dict) -> None:
    acc = metrics["accuracy"]
    acc.add_batch(predictions=[0, 1], references=[0, 0])
    acc.add_batch(predictions=[1, 1], references=[1, 1])
    assert acc.compute() == {"accuracy": 0.75}


def test_binary_by_hand(metrics: dict) -> None:
    # tp=2, fp=1, fn=1 for class 1.
    preds, refs = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    assert metrics["precision"].compute(predictions=preds, references=refs)["precision"] == 2 / 3
    assert metrics["recall"].compute(predictions=preds, references=refs)["recall"] == 2 / 3
    assert metrics["f1"].compute(predictions=preds, references=refs)["f1"] == pytest.approx(2 / 3)


def test_default_average_is_macro_beyond_two_classes(metrics: dict) -> None:
    preds, refs = [0, 1, 2, 2], [0, 1, 1, 2]
    auto = metrics["f1"].compute(predictions=preds, references=refs)["f1"]
    macro = metrics["f1"].compute(predictions=preds, references=refs, average="macro")["f1"]
    assert auto == macro
    with pytest.raises(ValueError, match="binary"):
        metrics["f1"].compute(predictions=preds, references=refs, average="binary")


def test_labels_force_multiclass_on_binary_looking_data(metrics: dict) -> None:
    preds, refs = [0, 1, 1], [0, 1, 0]
    binary = metrics["recall"].compute(predictions=preds, references=refs)["recall"]
    three = metrics["recall"].compute(predictions=preds, references=refs, labels=[0, 1, 2])
    assert binary == 1.0
    assert three["recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_average_none_and_zero_division(metrics: dict) -> None:
    out = metrics["precision"].compute(predictions=[0, 0, 0], references=[0, 1, 2], average="none")
    assert out["precision"] == [pytest.approx(1 / 3), 0.0, 0.0]


@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("average", ["macro", "micro", "weighted", None])
def test_matches_scikit_learn(metrics: dict, name: str, average: str | None) -> None:
    import sklearn.metrics as sk

    fn = getattr(sk, f"{name}_score")
    rng = np.random.default_rng(7)
    for n_classes in (2, 4):
        refs = rng.integers(0, n_classes, 60)
        preds = np.where(rng.random(60) < 0.6, refs, rng.integers(0, n_classes, 60))
        ours = metrics[name].compute(predictions=preds, references=refs, average=average)[name]
        sk_average = average or ("binary" if n_classes == 2 else "macro")
        theirs = fn(refs, preds, average=sk_average, zero_division=0)
        assert ours == pytest.approx(theirs, abs=1e-12), (n_classes, average)


def test_mismatched_lengths_rejected(metrics: dict) -> None:
    with pytest.raises(ValueError):
        metrics["accuracy"].compute(predictions=[0, 1], references=[0])


def test_perplexity_metric_is_per_token(metrics: dict) -> None:
    ppl = metrics["perplexity"]
    ppl.add_batch(nll=[6.0, 1.0], tokens=[3, 1])
    ppl.add_batch(nll=[1.0], tokens=[4])
    assert ppl.compute()["perplexity"] == pytest.approx(math.exp(8.0 / 8))


def test_compute_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(20.0, 10) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_perplexity_scorer_and_trainer_agree(metrics: dict) -> None:
    # One implementation: the scorer's result is the trainer's function of the same sums.
    ppl = metrics["perplexity"]
    assert ppl.compute(nll=[3.0, 4.5], tokens=[2, 3])["perplexity"] == perplexity(7.5, 5)
    assert ppl.compute(nll=[1e6], tokens=[1])["perplexity"] == math.inf
    with pytest.raises(ValueError):
        ppl.compute(nll=[1.0], tokens=[0])


def test_unknown_metric_without_hub_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate.config

    # Offline mode makes evaluate fail at once instead of timing out against the Hub.
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    with pytest.raises(ScorerUnavailable) as info:
        load_scorer("no-such-metric-xyz")
    assert info.value.name == "no-such-metric-xyz"
    assert "Hub" in info.value.hint and "accuracy" in info.value.hint


def test_gates_minimum_and_maximum() -> None:
    gates = {"accuracy": 0.8, "perplexity": 10.0}
    assert gate_failures(gates, {"accuracy": 0.8, "perplexity": 10.0}) == []
    assert gate_failures(gates, {"accuracy": 0.9, "perplexity": 3.0}) == []
    failures = gate_failures(gates, {"accuracy": 0.79, "perplexity": 10.5})
    assert len(failures) == 2
    assert "accuracy" in failures[0] and "below the minimum 0.8" in failures[0]
    assert "perplexity" in failures[1] and "above the maximum 10" in failures[1]


def test_gates_on_missing_or_nan_scores_fail() -> None:
    failures = gate_failures({"f1": 0.5, "loss": 1.0}, {"loss": float("nan")})
    assert len(failures) == 2
    assert all("no score" in f for f in failures)
    assert gate_failures({}, {"accuracy": 0.1}) == []
