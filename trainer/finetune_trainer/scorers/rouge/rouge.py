"""ROUGE-L: the longest common subsequence of words between generated and reference text.

An offline-safe stand-in for the Hub's `rouge` metric, loaded by path. The Hub's script imports
`rouge_score` too, and nltk's punkt data for rougeLsum; this one computes rouge1, rouge2 and
rougeL with `rouge_score` alone (no nltk data download) and reports the mean F1 of each, with
`rouge` = rougeL, the score a gate reads.
"""

import evaluate
from rouge_score import rouge_scorer

from finetune_trainer.scorers.common import metric_info

_DESCRIPTION = "ROUGE-1, ROUGE-2 and ROUGE-L F1 of predictions against references, averaged."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
Returns:
    rouge (float): mean ROUGE-L F1 in [0, 1]; 0 for no predictions.
    rouge1, rouge2, rougeL (float): mean F1 of each.
Examples:
    >>> rouge = evaluate.load("finetune_trainer/scorers/rouge")
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat sat"])["rouge"]
    1.0
"""
_TYPES = ("rouge1", "rouge2", "rougeL")


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions="string", references="string"
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        scorer = rouge_scorer.RougeScorer(list(_TYPES), use_stemmer=False)
        totals = dict.fromkeys(_TYPES, 0.0)
        for prediction, reference in zip(predictions, references, strict=True):
            scores = scorer.score(reference, prediction)  # target first
            for kind in _TYPES:
                totals[kind] += scores[kind].fmeasure
        n = len(predictions)
        means = {kind: totals[kind] / n if n else 0.0 for kind in _TYPES}
        return {"rouge": means["rougeL"], **means}
