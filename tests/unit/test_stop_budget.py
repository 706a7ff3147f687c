"""StopBudget: after each save, whether a stop (SIGTERM) could end its step and save within the
pods' termination grace period, as the trainer exports it and says it in its log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from accelerate import PartialState
from prometheus_client import CollectorRegistry

from finetune_api.pod import GRACE_PERIOD_GAUGE, STOP_SECONDS_GAUGE
from finetune_api.validation import parse_manifest
from finetune_trainer.loop import StopBudget
from finetune_trainer.telemetry import TrainerMetrics
from finetune_trainer.testing.tiny import causal_job


def gauges(metrics: TrainerMetrics) -> dict[str, float]:
    return {
        s.name: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name in (STOP_SECONDS_GAUGE, GRACE_PERIOD_GAUGE)
    }


def budget(template: dict[str, Any]) -> tuple[StopBudget, TrainerMetrics]:
    doc = causal_job(Path("/models/m"), Path("/data/d.jsonl"), name="stop", namespace="ml")
    doc["spec"]["template"] = template
    metrics = TrainerMetrics("stop", "ml", 0, CollectorRegistry(), process_metrics=False)
    return StopBudget(parse_manifest(doc), metrics), metrics


@pytest.fixture(autouse=True)
def accelerate_state() -> None:
    PartialState(cpu=True)  # accelerate's logger logs on the main process, once it knows it


def test_a_stop_that_does_not_fit_is_exported_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    stop, metrics = budget({"terminationGracePeriodSeconds": 20})
    # The longest recent step counts: a SIGTERM may come as one begins.
    for seconds in (3.0, 4.0, 2.5):
        stop.step(seconds, warm=True)
    stop.saved(18.5)
    assert gauges(metrics) == {STOP_SECONDS_GAUGE: 22.5, GRACE_PERIOD_GAUGE: 20.0}
    warned = [r.getMessage() for r in caplog.records if "grace period" in r.getMessage()]
    assert len(warned) == 1 and "take 22.5 s of its 20 s" in warned[0]
    assert "spec.template.terminationGracePeriodSeconds" in warned[0]
    # Later saves update the gauges, and the log says it only once.
    stop.saved(30.0)
    assert gauges(metrics)[STOP_SECONDS_GAUGE] == 34.0
    assert len([r for r in caplog.records if "grace period" in r.getMessage()]) == 1


def test_a_stop_that_fits_kubernetes_default_is_exported_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    stop, metrics = budget({})
    # A save after a run's first step, which warmed up (40 s: compiling): no estimate from it.
    stop.step(40.0, warm=False)
    stop.saved(6.0)
    assert gauges(metrics) == {}
    stop.step(1.5, warm=True)
    stop.saved(6.0)
    assert gauges(metrics) == {STOP_SECONDS_GAUGE: 7.5, GRACE_PERIOD_GAUGE: 30.0}
    assert "grace period" not in caplog.text
