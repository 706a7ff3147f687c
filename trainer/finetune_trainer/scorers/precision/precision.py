"""Precision for integer class labels, computed with numpy.

An offline-safe stand-in for the Hub's `precision` metric, loaded by path
(`evaluate.load("<this folder>")`); no Hub download and no scikit-learn. The results match
scikit-learn's `precision_score` with `zero_division=0`.
"""

from typing import Any

import evaluate

from finetune_trainer.scorers.common import classification_info, classification_scores


class Precision(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return classification_info("precision", __doc__)

    def _compute(self, predictions: list[int], references: list[int], **kw: Any) -> dict[str, Any]:
        return classification_scores("precision", predictions, references, **kw)
