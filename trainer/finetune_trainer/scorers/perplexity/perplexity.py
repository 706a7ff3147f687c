"""Perplexity from summed negative log-likelihood and token counts; loads no model.

The Hub's `perplexity` metric loads a model by id inside `compute`, so it is neither offline-safe
nor usable on the model being trained. Here the caller runs its own model and adds, per batch,
the summed token NLL (natural log) and the number of tokens it covers; perplexity is
exp(sum nll / sum tokens), i.e. per-token, not a mean of per-batch perplexities.
"""

import evaluate
import numpy as np

from finetune_trainer.scorers.common import metric_info
from finetune_trainer.scoring import perplexity

_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): summed negative log-likelihood (nats) of each batch.
    tokens (list of int): number of predicted tokens in each batch.
Returns:
    perplexity (float): exp(sum(nll) / sum(tokens)); inf when that overflows.
Examples:
    >>> ppl = evaluate.load("finetune_trainer/scorers/perplexity")
    >>> ppl.add_batch(nll=[6.0], tokens=[3])
    >>> ppl.compute()
    {'perplexity': 7.38905609893065}
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(__doc__ or "", _KWARGS_DESCRIPTION, nll="float64", tokens="int64")

    def _compute(self, nll: list[float], tokens: list[int]) -> dict[str, float]:
        # The trainer computes perplexity with the same function, straight from its sums.
        total_nll = float(np.sum(np.asarray(nll, dtype=np.float64)))
        return {"perplexity": perplexity(total_nll, int(np.sum(np.asarray(tokens, np.int64))))}
