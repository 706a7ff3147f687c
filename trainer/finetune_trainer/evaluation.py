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
    A scorer that cannot be loaded raises ScorerUnavailable on every rank, not only the main
    one: the others would otherwise wait for the broadcast until the hang watchdog fired.
    """
    from finetune_trainer.scoring import ScorerUnavailable

    outcome: list[dict[str, float] | tuple[str, str]] = [{}]
    if accelerator.is_main_process:
        try:
            outcome[0] = compute()
        except ScorerUnavailable as exc:
            outcome[0] = (exc.name, exc.hint)
    got = broadcast_object_list(outcome, from_process=0)[0]
    if isinstance(got, tuple):
        raise ScorerUnavailable(*got)
    return got
