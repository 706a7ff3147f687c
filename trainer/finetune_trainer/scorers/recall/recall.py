"""Recall for integer class labels, computed with numpy.

An offline-safe stand-in for the Hub's `recall` metric, loaded by path
(`evaluate.load("<this folder>")`); no Hub download and no scikit-learn. The results match
scikit-learn's `recall_score` with `zero_division=0`.
"""

from typing import Any

import evaluate

from finetune_trainer.scorers.common import classification_info, classification_scores


class Recall(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return classification_info("recall", __doc__)

    def _compute(self, predictions: list[int], references: list[int], **kw: Any) -> dict[str, Any]:
        return classification_scores("recall", predictions, references, **kw)
