"""Evaluation machinery that every task's `evaluate` shares.

A task runs its forward passes under `evaluating(model)`, gathers what it needs with
`accelerator.gather_for_metrics`, and turns the totals into scores with `scores_from_main`.
Gates are judged afterwards by `scoring.gate_failures`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without autograd for the block; back to train mode after it."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def scores_from_main(
    accelerator: Accelerator, compute: Callable[[], dict[str, float]]
) -> dict[str, float]:
    """`compute()` on the main process, its scores broadcast so every rank returns the same.

    Scorers are copied into the evaluate module cache when they load; one process does that.
    """
    scores: list[dict[str, float]] = [{}]
    if accelerator.is_main_process:
        scores[0] = compute()
    return broadcast_object_list(scores, from_process=0)[0]
