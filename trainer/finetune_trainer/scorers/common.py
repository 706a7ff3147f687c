"""Numpy code shared by the built-in scorers in this folder (no scikit-learn).

The scorers are loaded by path (`evaluate.load("<folder>")`); evaluate copies only the one script
into its module cache, so they import this module absolutely, from the installed package.
Precision, recall and f1 match scikit-learn's `*_score` with `zero_division=0`.

`average` and `labels` work as AVERAGE_DOC says.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import evaluate
import numpy as np

__all__ = [
    "AVERAGES",
    "AVERAGE_DOC",
    "classification_info",
    "classification_scores",
    "label_arrays",
    "metric_info",
]

AVERAGES = ("binary", "macro", "micro", "weighted", "none")
AVERAGE_DOC = """`average` (default None = automatic):
- automatic: "binary" when there are at most two classes and they are 0 and 1, else "macro". The
  classes are `labels` when given, else every label seen in predictions or references. Pass
  `labels=list(range(num_labels))` (or an explicit `average`) so that an evaluation set that
  happens to hold only 0s and 1s of a 3-class task is still scored as multi-class.
- "binary": the score of the class `pos_label` (default 1) alone.
- "macro": the unweighted mean of the per-class scores.
- "micro": from the global true-positive, false-positive and false-negative counts.
- "weighted": the per-class scores weighted by each class's number of references.
- "none": the per-class scores, as a list in the order of the sorted classes.
"""
Score = float | list[float]

_CLASSIFICATION_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    average (str or None): binary, macro, micro, weighted, none, or None for automatic
        (binary for labels 0/1, else macro).
    labels (list of int): the classes to score; default every label seen.
    pos_label (int): the positive class for binary averaging; default 1.
Returns:
    {name} (float, or list of float with average="none").
"""


def metric_info(description: str, inputs_description: str, **features: str) -> evaluate.MetricInfo:
    """MetricInfo with no citation and one `datasets.Value(dtype)` feature per keyword."""
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({k: datasets.Value(v) for k, v in features.items()}),
    )


def classification_info(name: str, doc: str | None) -> evaluate.MetricInfo:
    """MetricInfo of precision, recall or f1: `doc` (the module's) plus the `average` notes."""
    return metric_info(
        (doc or "").rstrip() + "\n\n" + AVERAGE_DOC,
        _CLASSIFICATION_KWARGS.format(name=name),
        predictions="int64",
        references="int64",
    )


def label_arrays(
    predictions: list[int], references: list[int], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and references as int64 arrays of the same, non-zero length."""
    preds = np.asarray(predictions, dtype=np.int64)
    refs = np.asarray(references, dtype=np.int64)
    if preds.shape != refs.shape:
        raise ValueError(f"{preds.shape[0]} predictions but {refs.shape[0]} references")
    if preds.size == 0:
        raise ValueError(f"{name} needs at least one prediction")
    return preds, refs


def _counts(
    predictions: list[int], references: list[int], labels: list[int] | None, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (classes, true positives, predicted counts, reference counts = support)."""
    preds, refs = label_arrays(predictions, references, name)
    classes = np.unique(np.concatenate([preds, refs])) if labels is None else np.asarray(labels)
    tp = np.array([np.sum((preds == c) & (refs == c)) for c in classes], dtype=np.float64)
    predicted = np.array([np.sum(preds == c) for c in classes], dtype=np.float64)
    actual = np.array([np.sum(refs == c) for c in classes], dtype=np.float64)
    return classes, tp, predicted, actual


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # zero_division=0, as scikit-learn reports it (without the warning).
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


PerClass = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
PER_CLASS: dict[str, PerClass] = {
    "precision": lambda tp, predicted, actual: _ratio(tp, predicted),
    "recall": lambda tp, predicted, actual: _ratio(tp, actual),
    # Per class the harmonic mean 2PR/(P+R) equals 2TP/(predicted+actual).
    "f1": lambda tp, predicted, actual: _ratio(2 * tp, predicted + actual),
}


def _score(
    name: str,
    predictions: list[int],
    references: list[int],
    average: str | None,
    labels: list[int] | None,
    pos_label: int,
) -> Score:
    per_class = PER_CLASS[name]
    classes, tp, predicted, actual = _counts(predictions, references, labels, name)
    if average is None:
        average = "binary" if set(classes.tolist()) <= {0, 1} else "macro"
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {', '.join(AVERAGES)} or None, not {average!r}")
    if average == "binary":
        if len(classes) > 2:
            raise ValueError(
                f"average='binary' needs at most 2 classes, got {len(classes)}; use macro, "
                "micro or weighted"
            )
        hit = classes == pos_label
        if not hit.any():
            return 0.0
        return float(per_class(tp[hit], predicted[hit], actual[hit])[0])
    if average == "micro":
        return float(
            per_class(
                tp.sum(keepdims=True), predicted.sum(keepdims=True), actual.sum(keepdims=True)
            )[0]
        )
    scores = per_class(tp, predicted, actual)
    if average == "none":
        return [float(s) for s in scores]
    if average == "weighted":
        total = actual.sum()
        return float(np.sum(scores * actual) / total) if total > 0 else 0.0
    return float(scores.mean())


def classification_scores(
    name: str,
    predictions: list[int],
    references: list[int],
    average: str | None = None,
    labels: list[int] | None = None,
    pos_label: int = 1,
) -> dict[str, Score]:
    """`{name: score}` for name precision, recall or f1; `average` as in AVERAGE_DOC."""
    return {name: _score(name, predictions, references, average, labels, pos_label)}
