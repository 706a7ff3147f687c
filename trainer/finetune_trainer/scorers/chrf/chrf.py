"""chrF: character n-gram F-score of generated text against one reference each (sacrebleu).

An offline-safe stand-in for the Hub's `chrf` metric, loaded by path; sacrebleu's defaults
(character 6-grams, no word n-grams, beta 2), on its 0-100 scale. Unlike BLEU it gives partial
credit below the word level, so it moves before a model gets whole answers right.
"""

import evaluate
import sacrebleu

from finetune_trainer.scorers.common import metric_info

_DESCRIPTION = "Corpus chrF (sacrebleu) of predictions against one reference each, 0 to 100."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers, one per prediction.
Returns:
    chrf (float): in [0, 100]; 0 for no predictions.
Examples:
    >>> chrf = evaluate.load("finetune_trainer/scorers/chrf")
    >>> chrf.compute(predictions=["abc"], references=["abc"])
    {'chrf': 100.0}
"""


class Chrf(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions="string", references="string"
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if not predictions:
            return {"chrf": 0.0}
        return {"chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score)}
