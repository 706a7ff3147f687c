"""Perplexity from summed negative log-likelihood and token counts; loads no model.

The Hub's `perplexity` metric loads a model by id inside `compute`, so it is neither offline-safe
nor usable on the model being trained. Here the caller runs its own model and adds, per batch,
the summed token NLL (natural log) and the number of tokens it covers; perplexity is
exp(sum nll / sum tokens), i.e. per-token, not a mean of per-batch perplexities.
"""

import math

import evaluate
import numpy as np

from finetune_trainer.classification_metrics import metric_info

_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): summed negative log-likelihood (nats) of each batch.
    tokens (list of int): number of predicted tokens in each batch.
Returns:
    perplexity (float): exp(sum(nll) / sum(tokens)); inf when that overflows.
Examples:
    >>> ppl = evaluate.load("finetune_trainer/metrics/perplexity")
    >>> ppl.add_batch(nll=[6.0], tokens=[3])
    >>> ppl.compute()
    {'perplexity': 7.38905609893065}
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(__doc__ or "", _KWARGS_DESCRIPTION, nll="float64", tokens="int64")

    def _compute(self, nll: list[float], tokens: list[int]) -> dict[str, float]:
        total_tokens = int(np.sum(np.asarray(tokens, dtype=np.int64)))
        if total_tokens <= 0:
            raise ValueError("perplexity needs a positive token count")
        total_nll = float(np.sum(np.asarray(nll, dtype=np.float64)))
        try:
            return {"perplexity": math.exp(total_nll / total_tokens)}
        except OverflowError:
            return {"perplexity": math.inf}
