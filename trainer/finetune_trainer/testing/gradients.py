"""Training a model in process and comparing the gradients of two runs, for tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def assert_same_gradients(
    expected: Mapping[str, torch.Tensor | None], got: Mapping[str, torch.Tensor | None]
) -> None:
    """`got` has a gradient for every trainable weight `expected` has, equal to float noise:
    gradient checkpointing, say, must change what is kept, never what is learnt."""
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)


def descend(
    loss: Callable[[], torch.Tensor], model: torch.nn.Module, steps: int, lr: float
) -> list[float]:
    """`steps` AdamW steps on the trainable weights of `model`, each on `loss()`; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(value.detach()))
    return losses
