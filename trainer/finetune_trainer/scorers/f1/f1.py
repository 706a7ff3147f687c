"""F1 (the harmonic mean of precision and recall) for integer class labels, computed with numpy.

An offline-safe stand-in for the Hub's `f1` metric, loaded by path
(`evaluate.load("<this folder>")`); no Hub download and no scikit-learn. The results match
scikit-learn's `f1_score` with `zero_division=0`.
"""

from typing import Any

import evaluate

from finetune_trainer.scorers.common import classification_info, classification_scores


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return classification_info("f1", __doc__)

    def _compute(self, predictions: list[int], references: list[int], **kw: Any) -> dict[str, Any]:
        return classification_scores("f1", predictions, references, **kw)
