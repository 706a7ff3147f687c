"""Evaluation on the eval split, before and after training.

Gates are judged by `scoring.gate_failures` (a gate on a lower-is-better metric is a maximum).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from accelerate import Accelerator

from finetune_trainer.data import IGNORE_INDEX

# Computed from the summed NLL here; the upstream `perplexity` metric downloads a model.
TOKEN_METRICS = frozenset({"perplexity", "loss"})


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL and the number of scored tokens."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def evaluate_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    metrics: list[str],
    *,
    causal: bool,
    num_labels: int,
) -> dict[str, float]:
    """Scores on the whole eval split; `batches` is a prepared loader, so `gather_for_metrics`
    drops the rows that even sharding duplicated. Every rank returns the same scores."""
    model.eval()
    nll_sum, token_count = 0.0, 0
    predictions: list[torch.Tensor] = []
    references: list[torch.Tensor] = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if causal:
            nll, tokens = _token_nll(logits, batch["labels"])
            nll, tokens = accelerator.gather_for_metrics((nll, tokens))
            nll_sum += float(nll.double().sum())
            token_count += int(tokens.sum())
        else:
            nll = torch.nn.functional.cross_entropy(
                logits.float(), batch["labels"], reduction="none"
            )
            preds, refs, nll = accelerator.gather_for_metrics(
                (logits.argmax(-1), batch["labels"], nll)
            )
            predictions.append(preds.cpu())
            references.append(refs.cpu())
            nll_sum += float(nll.double().sum())
            token_count += len(refs)  # for `loss`: one prediction per example
    model.train()
    scores: list[dict[str, float]] = [{}]
    if accelerator.is_main_process:
        # Metric modules are copied into the evaluate cache on load; one process does it.
        scores[0] = _score(
            metrics, nll_sum, token_count, predictions, references, num_labels=num_labels
        )
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(scores, from_process=0)[0]


def _score(
    metrics: list[str],
    nll_sum: float,
    token_count: int,
    predictions: list[torch.Tensor],
    references: list[torch.Tensor],
    *,
    num_labels: int,
) -> dict[str, float]:
    from finetune_trainer.scoring import compute_perplexity, load_metric

    out: dict[str, float] = {}
    for name in metrics:
        if name == "perplexity":
            out[name] = float(compute_perplexity(nll_sum, token_count))
        elif name == "loss":
            out[name] = nll_sum / token_count if token_count else math.nan
        else:
            kwargs = (
                {"average": "macro"}
                if name in ("f1", "precision", "recall") and (num_labels > 2)
                else {}
            )
            result = load_metric(name).compute(
                predictions=torch.cat(predictions).tolist() if predictions else [],
                references=torch.cat(references).tolist() if references else [],
                **kwargs,
            )
            value = result.get(name, next(iter(result.values()))) if result else math.nan
            out[name] = float(value)
    return out
