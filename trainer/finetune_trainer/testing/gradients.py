"""Comparing the gradients of two runs of the same model, for tests."""

from __future__ import annotations

from collections.abc import Mapping

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
