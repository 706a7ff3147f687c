"""Exact match: the fraction of generated answers equal to their references.

An offline-safe stand-in for the Hub's `exact_match` metric, loaded by path
(`evaluate.load("<this folder>")`). Surrounding whitespace is stripped before comparing: greedy
generation stops at a newline or the end-of-turn token as often as not, and that is no error.
"""

import evaluate

from finetune_trainer.scorers.common import metric_info

_DESCRIPTION = "Exact match is the fraction of predictions equal to their reference strings."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
    ignore_case (bool): compare case-insensitively; default false.
Returns:
    exact_match (float): in [0, 1]; 0 for no predictions.
Examples:
    >>> exact_match = evaluate.load("finetune_trainer/scorers/exact_match")
    >>> exact_match.compute(predictions=["a ", "b"], references=["a", "c"])
    {'exact_match': 0.5}
"""


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION, _KWARGS_DESCRIPTION, predictions="string", references="string"
        )

    def _compute(
        self, predictions: list[str], references: list[str], ignore_case: bool = False
    ) -> dict[str, float]:
        def norm(text: str) -> str:
            return text.strip().lower() if ignore_case else text.strip()

        same = sum(norm(p) == norm(r) for p, r in zip(predictions, references, strict=True))
        return {"exact_match": same / len(predictions) if predictions else 0.0}
