"""TrainerMetrics: two rank exporters in one process, scraped over HTTP."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_api.pod import HISTOGRAM_MAX_RANKS_ENV
from finetune_trainer.telemetry import (
    CHECKPOINT_BUCKETS,
    HISTOGRAM_MAX_RANKS,
    STARTUP_PHASES,
    STEP_DURATION_BUCKETS,
    TrainerMetrics,
    flops_per_token,
)

LABELS = {"finetunejob": "tiny-lora", "namespace": "ml"}


def scrape(port: int) -> dict[str, list]:
    """Sample name -> list of (labels, value) from a live /metrics endpoint."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    matches = [v for lb, v in samples[name] if all(lb.get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


@pytest.fixture
def ranks() -> Iterator[tuple[TrainerMetrics, TrainerMetrics, int, int]]:
    r0 = TrainerMetrics("tiny-lora", "ml", 0)
    r1 = TrainerMetrics("tiny-lora", "ml", 1)
    p0, p1 = r0.start_server(0, "127.0.0.1"), r1.start_server(0, "127.0.0.1")
    yield r0, r1, p0, p1
    r0.stop_server()
    r1.stop_server()


def test_each_instance_has_its_own_registry_and_port(ranks) -> None:
    r0, r1, p0, p1 = ranks
    assert p0 > 0 and p1 > 0 and p0 != p1
    assert r0.registry is not r1.registry


def test_initial_series_and_constant_labels(ranks) -> None:
    _, _, p0, p1 = ranks
    for rank, port in (("0", p0), ("1", p1)):
        s = scrape(port)
        assert value(s, "finetune_train_tokens_total", **LABELS, rank=rank) == 0
        assert value(s, "finetune_train_step_duration_seconds_count", rank=rank) == 0
        started = value(
            s, "finetune_startup_phase_timestamp_seconds", phase="process_started", rank=rank
        )
        assert abs(started - time.time()) < 60
        for name, samples in s.items():
            if name.startswith("finetune_"):
                for labels, _ in samples:
                    assert labels["finetunejob"] == "tiny-lora", name
                    assert labels["namespace"] == "ml", name
                    assert labels["rank"] == rank, name
                    assert "job" not in labels, name
        assert "process_cpu_seconds_total" in s or "python_info" in s


def test_steps_eval_and_counters_grow(ranks) -> None:
    r0, r1, p0, p1 = ranks
    r0.record_phase("model_loaded")
    r0.record_phase("data_loaded")
    r0.record_phase("rendezvous")
    r0.set_status("training")
    r0.record_step(1, 0.1, 2.5, 1e-4, 0.9, tokens=512, samples=4, duration_s=0.5, total_steps=10)
    first = scrape(p0)
    r0.record_step(2, 0.2, 2.0, 9e-5, None, tokens=512, samples=4, duration_s=1.5, total_steps=10)
    r1.record_step(1, 0.1, 2.6, 1e-4, 0.8, tokens=100, samples=1, duration_s=2.0, total_steps=10)
    r0.record_eval("before", {"accuracy": 0.5, "f1": float("nan")})
    r0.record_eval("after", {"accuracy": 0.8})
    r0.record_checkpoint(1.25)
    r0.record_peak_memory(3 * 2**30)
    r0.record_flops(flops_per_token(1000, 10) * r0.tokens_per_second, peak_flops_per_second=1e9)
    r0.set_status("pushing")
    s, s1 = scrape(p0), scrape(p1)

    rank0 = {**LABELS, "rank": "0"}
    assert value(first, "finetune_train_tokens_total", **rank0) == 512
    assert value(s, "finetune_train_tokens_total", **rank0) == 1024
    assert value(s, "finetune_train_samples_total", **rank0) == 8
    assert value(s1, "finetune_train_tokens_total", rank="1") == 100
    assert value(s, "finetune_train_step", **rank0) == 2
    assert value(s, "finetune_train_total_steps", **rank0) == 10
    assert value(s, "finetune_train_epoch", **rank0) == pytest.approx(0.2)
    assert value(s, "finetune_train_loss", **rank0) == 2.0
    assert value(s, "finetune_train_learning_rate", **rank0) == pytest.approx(9e-5)
    # None keeps the last known gradient norm rather than exporting a fake value.
    assert value(s, "finetune_train_grad_norm", **rank0) == pytest.approx(0.9)
    assert value(s, "finetune_train_tokens_per_second", **rank0) == pytest.approx(1024 / 2.0)
    assert r0.tokens_per_second == pytest.approx(512.0)
    assert value(s, "finetune_train_step_duration_seconds_count", **rank0) == 2
    assert value(s, "finetune_train_step_duration_seconds_sum", **rank0) == 2.0
    assert value(s, "finetune_train_step_duration_seconds_bucket", le="1.0", rank="0") == 1
    assert value(s, "finetune_train_step_duration_seconds_bucket", le="+Inf", rank="0") == 2
    assert abs(value(s, "finetune_train_last_step_timestamp_seconds", rank="0") - time.time()) < 60
    assert value(s, "finetune_eval_score", metric="accuracy", stage="before") == 0.5
    assert value(s, "finetune_eval_score", metric="accuracy", stage="after") == 0.8
    assert not [lb for lb, _ in s["finetune_eval_score"] if lb["metric"] == "f1"]
    assert value(s, "finetune_checkpoint_save_duration_seconds_count", rank="0") == 1
    assert value(s, "finetune_checkpoint_save_duration_seconds_sum", rank="0") == 1.25
    assert value(s, "finetune_accelerator_memory_peak_bytes", rank="0") == 3 * 2**30
    assert value(s, "finetune_train_achieved_flops_per_second", rank="0") == 4020 * 512
    assert value(s, "finetune_train_model_flops_utilization_ratio", rank="0") == pytest.approx(
        4020 * 512 / 1e9
    )
    assert value(s, "finetune_trainer_status", status="pushing") == 1
    assert value(s, "finetune_trainer_status", status="training") == 0

    stamps = {lb["phase"]: v for lb, v in s["finetune_startup_phase_timestamp_seconds"]}
    recorded = {"process_started", "model_loaded", "data_loaded", "rendezvous", "first_step"}
    assert set(stamps) == recorded and recorded <= set(STARTUP_PHASES)
    assert stamps["process_started"] <= stamps["model_loaded"] <= stamps["first_step"]
    # record_step set first_step once; later steps do not move it.
    first_stamps = {lb["phase"]: v for lb, v in first["finetune_startup_phase_timestamp_seconds"]}
    assert stamps["first_step"] == first_stamps["first_step"]
    # rank 1 reports only its own phases
    assert {lb["phase"] for lb, _ in s1["finetune_startup_phase_timestamp_seconds"]} == {
        "process_started",
        "first_step",
    }


def test_phase_stamps_for_the_result_match_the_gauge(ranks) -> None:
    """The stamps rank 0 writes into its result are the ones its gauge exports, last_step is
    the last record_step's time, and an attempt without steps stamps no last_step."""
    r0, _, p0, _ = ranks
    r0.record_last_step()
    assert "last_step" not in r0.phases
    for step in (1, 2):
        r0.record_step(step, 0.1, 2.0, 1e-4, None, 8, 1, 0.01, total_steps=2)
    r0.record_last_step()
    r0.record_phase("evaluated_after")
    stamps = {lb["phase"]: v for lb, v in scrape(p0)["finetune_startup_phase_timestamp_seconds"]}
    assert set(r0.phases) == set(stamps) == {
        "process_started", "first_step", "last_step", "evaluated_after"
    }  # fmt: skip
    for name, at in r0.phases.items():
        assert at == pytest.approx(stamps[name], abs=1e-3)
    assert value(
        scrape(p0), "finetune_train_last_step_timestamp_seconds", rank="0"
    ) == pytest.approx(r0.phases["last_step"], abs=1e-3)
    assert r0.phases["first_step"] <= r0.phases["last_step"] <= r0.phases["evaluated_after"]


def test_throughput_window_smooths_over_recent_steps() -> None:
    m = TrainerMetrics("j", "ns", 0, process_metrics=False)
    for step in range(1, 41):
        m.record_step(step, 0.0, 1.0, 1e-4, None, 100, 1, 1.0, 40)
    assert m.tokens_per_second == pytest.approx(100.0)
    for step in range(41, 61):  # a full window of slower steps replaces the old rate
        m.record_step(step, 0.0, 1.0, 1e-4, None, 100, 1, 2.0, 60)
    assert m.tokens_per_second == pytest.approx(50.0)


def test_bad_stage_rejected_and_server_not_started_twice() -> None:
    m = TrainerMetrics("j", "ns", 0, process_metrics=False)
    with pytest.raises(ValueError):
        m.record_eval("during", {"accuracy": 1.0})  # type: ignore[arg-type]
    m.start_server(0, "127.0.0.1")
    try:
        with pytest.raises(RuntimeError):
            m.start_server(0, "127.0.0.1")
    finally:
        m.stop_server()


def test_flops_per_token() -> None:
    # LoRA: frozen base costs forward + activation gradients only.
    assert flops_per_token(1_000_000, 10_000) == 4_000_000 + 20_000
    # Full fine-tuning reduces to the familiar 6N.
    assert flops_per_token(1_000_000, 1_000_000) == 6_000_000
    assert flops_per_token(100, 0, n_layers=2, seq_length=8, d_model=4) == 400 + 12 * 2 * 8 * 4
    with pytest.raises(ValueError):
        flops_per_token(10, 11)


def step_and_checkpoint(metrics: TrainerMetrics) -> TrainerMetrics:
    metrics.record_step(1, 0.1, 2.0, 1e-4, 0.5, tokens=64, samples=1, duration_s=0.2, total_steps=9)
    metrics.record_checkpoint(0.5)
    return metrics


def series_count(metrics: TrainerMetrics) -> int:
    """Series the rank's `finetune_*` families expose after a step and a checkpoint."""
    step_and_checkpoint(metrics)
    return sum(
        len(family.samples)
        for family in metrics.registry.collect()
        if family.name.startswith("finetune_")
    )


def sample_names(metrics: TrainerMetrics) -> set[str]:
    """Sample names the rank exposes after a step and a checkpoint."""
    step_and_checkpoint(metrics)
    return {s.name for family in metrics.registry.collect() for s in family.samples}


HISTOGRAM_SAMPLES = {
    "finetune_train_step_duration_seconds_count",
    "finetune_checkpoint_save_duration_seconds_count",
}


def test_per_rank_histograms_only_up_to_the_rank_limit() -> None:
    small = TrainerMetrics("j", "ns", 7, process_metrics=False, world_size=64)
    large_rank0 = TrainerMetrics("j", "ns", 0, process_metrics=False, world_size=2048)
    large_rank7 = TrainerMetrics("j", "ns", 7, process_metrics=False, world_size=2048)
    assert sample_names(small) >= HISTOGRAM_SAMPLES
    assert sample_names(large_rank0) >= HISTOGRAM_SAMPLES
    assert not HISTOGRAM_SAMPLES & sample_names(large_rank7)
    assert large_rank7.histograms is False
    # Everything else is still exported by every rank.
    assert "finetune_train_loss" in sample_names(large_rank7)
    assert "finetune_checkpoint_last_timestamp_seconds" in sample_names(large_rank7)


def test_a_256x8_gang_exports_far_fewer_series() -> None:
    world = 256 * 8
    per_rank = series_count(TrainerMetrics("j", "ns", 1, process_metrics=False, world_size=8))
    without = series_count(TrainerMetrics("j", "ns", 1, process_metrics=False, world_size=world))
    rank0 = series_count(TrainerMetrics("j", "ns", 0, process_metrics=False, world_size=world))
    assert rank0 == per_rank
    all_ranks_histograms = world * per_rank
    opt_in_default = rank0 + (world - 1) * without
    # The histograms are most of a rank's series: 36 of them with today's buckets.
    histogram_series = per_rank - without
    assert histogram_series >= len(STEP_DURATION_BUCKETS) + len(CHECKPOINT_BUCKETS) + 4
    assert all_ranks_histograms > 80_000
    assert all_ranks_histograms - opt_in_default == (world - 1) * histogram_series
    assert opt_in_default < all_ranks_histograms / 2


def test_rank_limit_and_world_size_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2048")
    assert TrainerMetrics("j", "ns", 3, process_metrics=False).histograms is False
    monkeypatch.setenv(HISTOGRAM_MAX_RANKS_ENV, "4096")  # opted in
    assert TrainerMetrics("j", "ns", 3, process_metrics=False).histograms is True
    monkeypatch.setenv(HISTOGRAM_MAX_RANKS_ENV, "0")  # rank 0 only, whatever the size
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TrainerMetrics("j", "ns", 1, process_metrics=False).histograms is False
    assert TrainerMetrics("j", "ns", 0, process_metrics=False).histograms is True
    # A typo shapes metrics only: it falls back to the default instead of failing the run.
    monkeypatch.setenv(HISTOGRAM_MAX_RANKS_ENV, "lots")
    assert TrainerMetrics("j", "ns", 1, process_metrics=False).histograms is True
    monkeypatch.setenv("WORLD_SIZE", str(HISTOGRAM_MAX_RANKS + 1))
    assert TrainerMetrics("j", "ns", 1, process_metrics=False).histograms is False
