"""F1 (the harmonic mean of precision and recall) for integer class labels, computed with numpy.

An offline-safe stand-in for the Hub's `f1` metric, loaded by path
(`evaluate.load("<this folder>")`); no Hub download and no scikit-learn. The results match
scikit-learn's `f1_score` with `zero_division=0`.

`average` (default None = automatic):
- automatic: "binary" when there are at most two classes and they are 0 and 1, else "macro". The
  classes are `labels` when given, else every label seen in predictions or references. Pass
  `labels=list(range(num_labels))` (or an explicit `average`) so that an evaluation set that
  happens to hold only 0s and 1s of a 3-class task is still scored as multi-class.
- "binary": the score of the class `pos_label` (default 1) alone.
- "macro": the unweighted mean of the per-class scores.
- "micro": from the global true-positive, false-positive and false-negative counts.
- "weighted": the per-class scores weighted by each class's number of references.
- "none": the per-class scores, as a list in the order of the sorted classes.
Each file is self-contained (evaluate copies only the one script into its module cache), so
precision, recall and f1 repeat this helper.
"""

import datasets
import evaluate
import numpy as np

_AVERAGES = ("binary", "macro", "micro", "weighted", "none")

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    average (str or None): binary, macro, micro, weighted, none, or None for automatic
        (binary for labels 0/1, else macro).
    labels (list of int): the classes to score; default every label seen.
    pos_label (int): the positive class for binary averaging; default 1.
Returns:
    f1 (float, or list of float with average="none").
"""


def _counts(
    predictions: list[int], references: list[int], labels: list[int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (classes, true positives, predicted counts, reference counts = support)."""
    preds = np.asarray(predictions, dtype=np.int64)
    refs = np.asarray(references, dtype=np.int64)
    if preds.shape != refs.shape:
        raise ValueError(f"{preds.shape[0]} predictions but {refs.shape[0]} references")
    if preds.size == 0:
        raise ValueError("f1 needs at least one prediction")
    classes = np.unique(np.concatenate([preds, refs])) if labels is None else np.asarray(labels)
    tp = np.array([np.sum((preds == c) & (refs == c)) for c in classes], dtype=np.float64)
    predicted = np.array([np.sum(preds == c) for c in classes], dtype=np.float64)
    actual = np.array([np.sum(refs == c) for c in classes], dtype=np.float64)
    return classes, tp, predicted, actual


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # zero_division=0, as scikit-learn reports it (without the warning).
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _per_class(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    # Per class the harmonic mean 2PR/(P+R) equals 2TP/(predicted+actual).
    return _ratio(2 * tp, predicted + actual)


def _score(
    predictions: list[int],
    references: list[int],
    average: str | None,
    labels: list[int] | None,
    pos_label: int,
) -> float | list[float]:
    classes, tp, predicted, actual = _counts(predictions, references, labels)
    if average is None:
        average = "binary" if set(classes.tolist()) <= {0, 1} else "macro"
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {', '.join(_AVERAGES)} or None, not {average!r}")
    if average == "binary":
        if len(classes) > 2:
            raise ValueError(
                f"average='binary' needs at most 2 classes, got {len(classes)}; use macro, "
                "micro or weighted"
            )
        hit = classes == pos_label
        if not hit.any():
            return 0.0
        return float(_per_class(tp[hit], predicted[hit], actual[hit])[0])
    if average == "micro":
        return float(
            _per_class(
                tp.sum(keepdims=True), predicted.sum(keepdims=True), actual.sum(keepdims=True)
            )[0]
        )
    scores = _per_class(tp, predicted, actual)
    if average == "none":
        return [float(s) for s in scores]
    if average == "weighted":
        total = actual.sum()
        return float(np.sum(scores * actual) / total) if total > 0 else 0.0
    return float(scores.mean())


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__ or "",
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        average: str | None = None,
        labels: list[int] | None = None,
        pos_label: int = 1,
    ) -> dict[str, float | list[float]]:
        return {"f1": _score(predictions, references, average, labels, pos_label)}
