"""Accuracy: the fraction of predictions equal to their references.

An offline-safe stand-in for the Hub's `accuracy` metric, loaded by path
(`evaluate.load("<this folder>")`). It needs only numpy, so no Hub download and no scikit-learn.
"""

import evaluate
import numpy as np

from finetune_trainer.scorers.common import label_arrays, metric_info

_DESCRIPTION = "Accuracy is the fraction of predictions that equal their reference labels."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): true (default) returns the fraction correct, false the count correct.
    sample_weight (list of float): optional per-example weights.
Returns:
    accuracy (float): in [0, 1] when normalize is true.
Examples:
    >>> accuracy = evaluate.load("finetune_trainer/scorers/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions="int64", references="int64"
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        preds, refs = label_arrays(predictions, references, "accuracy")
        weights = (
            np.ones(preds.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
        )
        correct = float(np.sum(weights * (preds == refs)))
        return {"accuracy": correct / float(np.sum(weights)) if normalize else correct}
