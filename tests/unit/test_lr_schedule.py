"""training.lrSchedulerType, warmupSteps and warmupRatio: the learning rate of each optimizer step
as the trainer's scheduler (transformers' own) sets it, and the rules that refuse what it
cannot mean."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_api import ManifestError
from finetune_api.v1alpha1 import TrainingSpec
from finetune_api.validation import parse_manifest
from finetune_trainer.testing.tiny import causal_job
from finetune_trainer.train import lr_schedule

PEAK = 1e-3
STEPS = 20


def rates(**training: Any) -> list[float]:
    """The learning rate of each of STEPS optimizer steps (the rate a step uses is the one set
    before it: the scheduler steps after the optimizer)."""
    spec = TrainingSpec.model_validate({"learningRate": PEAK, **training})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    schedule = lr_schedule(spec, optimizer, STEPS)
    out = []
    for _ in range(STEPS):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_linear_by_default_from_the_warm_up_down_to_zero() -> None:
    lr = rates(warmupSteps=4)
    assert lr[:5] == pytest.approx([0, PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK])
    # Linear down from step 4 to 0 at step 20.
    assert lr[12] == pytest.approx(PEAK / 2)
    assert lr[-1] == pytest.approx(PEAK / 16)


def test_cosine_after_a_warm_up_ratio_rounded_up() -> None:
    # 0.05 of 20 steps is 1 step of warm-up; 0.06 is 1.2, rounded up to 2 (transformers' rule).
    assert rates(warmupRatio=0.05, lrSchedulerType="cosine")[1] == pytest.approx(PEAK)
    lr = rates(warmupRatio=0.06, lrSchedulerType="cosine")
    assert lr[:3] == pytest.approx([0, PEAK / 2, PEAK])
    # Half a cosine over the 18 steps after it: the midpoint at step 11, a quarter at 2 + 12.
    assert lr[11] == pytest.approx(PEAK / 2)
    assert lr[14] == pytest.approx(PEAK * (1 + math.cos(math.pi * 12 / 18)) / 2)
    assert lr[-1] < PEAK * 0.01


def test_constant_and_constant_with_warmup() -> None:
    assert rates(lrSchedulerType="constant") == pytest.approx([PEAK] * STEPS)
    lr = rates(lrSchedulerType="constant_with_warmup", warmupSteps=2)
    assert lr == pytest.approx([0, PEAK / 2] + [PEAK] * (STEPS - 2))


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"warmupSteps": 10, "warmupRatio": 0.03}, "warmupRatio"),
        ({"lrSchedulerType": "constant", "warmupSteps": 5}, "lrSchedulerType"),
        ({"lrSchedulerType": "constant", "warmupRatio": 0.1}, "lrSchedulerType"),
    ],
)
def test_what_the_schedule_cannot_mean_is_refused(training: dict[str, Any], field: str) -> None:
    doc = causal_job(Path("/m"), Path("/d.jsonl"))
    doc["spec"]["training"].update(training)
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc)
    assert field in str(info.value)
