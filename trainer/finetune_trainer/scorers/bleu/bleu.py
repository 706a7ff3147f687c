"""BLEU: corpus BLEU of generated text against one reference each, through sacrebleu.

An offline-safe stand-in for the Hub's `sacrebleu`/`bleu` metrics, loaded by path; sacrebleu's
defaults (13a tokenisation, exponential smoothing), on its 0-100 scale.
"""

import evaluate
import sacrebleu

from finetune_trainer.scorers.common import metric_info

_DESCRIPTION = "Corpus BLEU (sacrebleu) of predictions against one reference each, 0 to 100."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers, one per prediction.
Returns:
    bleu (float): in [0, 100]; 0 for no predictions.
Examples:
    >>> bleu = evaluate.load("finetune_trainer/scorers/bleu")
    >>> bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])
    {'bleu': 100.00000000000004}
"""


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions="string", references="string"
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if not predictions:
            return {"bleu": 0.0}
        return {"bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score)}
