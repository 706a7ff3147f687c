"""Prometheus metrics of one trainer rank.

Every series carries the labels `finetunejob`, `namespace` and `rank`. `finetunejob` is used
instead of `job` because Prometheus sets `job` (the scrape job) and, with Kubernetes service
discovery, usually `namespace` as target labels; an exposed label of the same name is renamed
`exported_job`/`exported_namespace` (or, with honor_labels, overwrites the target's). `namespace`
is exposed anyway so that series stay attributable when scraped from outside the cluster or
remote-written; in-cluster it matches the target label, so the rename is harmless.

Each `TrainerMetrics` owns its `CollectorRegistry` (not prometheus_client's global one), so a
process (or a test) can hold several. The catalogue is in docs/metrics.md.

Histograms cost a series per bucket, so per-rank histograms are opt-in above a rank count: a
gang of up to `FINETUNE_METRICS_HISTOGRAM_MAX_RANKS` ranks (default 64) exports them from every
rank, a larger one from rank 0 only. A 256 x 8 gang would otherwise export about 74k histogram
series; the ranks of a gang step in lockstep, so rank 0's step times stand for the gang's.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from finetune_api import phases
from finetune_api.pod import (
    GRACE_PERIOD_GAUGE,
    HISTOGRAM_MAX_RANKS_ENV,
    RESUMED_FROM_STEP_GAUGE,
    RESUMED_TIMESTAMP_GAUGE,
    STOP_SECONDS_GAUGE,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_BUCKETS",
    "HISTOGRAM_MAX_RANKS",
    "STARTUP_PHASES",
    "STEP_DURATION_BUCKETS",
    "TrainerMetrics",
    "flops_per_token",
]

LABELS = ("finetunejob", "namespace", "rank")
STARTUP_PHASES = phases.STARTUP
# From a tiny model on an accelerator (10 ms) to a large one on CPU with accumulation (10 min).
STEP_DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Adapters save in well under a second; full models and slow volumes take minutes.
CHECKPOINT_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
# tokens_per_second averages over this many recent steps: one step is noisy (data loading,
# checkpoint saves), an all-time mean hides slow-downs.
THROUGHPUT_WINDOW = 20
# Every rank of a gang up to this size exports histograms (8 nodes of 8 accelerators: about 2k
# series); above it only rank 0 does, unless HISTOGRAM_MAX_RANKS_ENV says more.
HISTOGRAM_MAX_RANKS = 64


def exports_histograms(rank: int, world_size: int, max_ranks: int) -> bool:
    """Whether this rank exports the step and checkpoint histograms: rank 0 always does."""
    return rank == 0 or world_size <= max_ranks


def _env_int(name: str, default: int) -> int:
    """An integer from the environment; a bad value warns and falls back rather than fail the
    run, since it only shapes metrics."""
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        return default


def flops_per_token(
    n_params_total: int,
    n_params_trainable: int,
    *,
    n_layers: int = 0,
    seq_length: int = 0,
    d_model: int = 0,
) -> float:
    """Training FLOPs per token of a (LoRA) fine-tune: 4·N_total + 2·N_trainable (+ attention).

    Per token and per parameter, a matrix multiply costs 2 FLOPs (multiply + add):
    - forward: 2·N_total;
    - backward, gradients w.r.t. activations: 2·N_total; they must flow through the frozen base
      weights to reach every adapter below, so frozen parameters still cost this;
    - backward, gradients w.r.t. weights: 2·N_trainable, only for parameters that train.
    Full fine-tuning (N_trainable = N_total) gives the familiar 6·N; LoRA with a frozen base gives
    about 4·N, so using 6·N would overstate a LoRA run's MFU by up to 50%.

    Optional attention term (pass n_layers, seq_length and d_model): the QK^T and AV products
    have no parameters, cost 2·2·n_layers·seq_length·d_model FLOPs per token forward (causal
    masking not discounted) and twice that backward (activation gradients only), 12·n_layers·
    seq_length·d_model in all. It matters when seq_length is comparable to d_model or larger.
    Embedding lookups are not matmuls; callers may exclude embedding parameters from N.
    """
    if n_params_trainable > n_params_total:
        raise ValueError("n_params_trainable cannot exceed n_params_total")
    flops = 4.0 * n_params_total + 2.0 * n_params_trainable
    flops += 12.0 * n_layers * seq_length * d_model
    return flops


class TrainerMetrics:
    """The metrics of one trainer rank, in a registry of its own.

    Thread-safe as prometheus_client metrics are; the throughput window has its own lock.
    """

    def __init__(
        self,
        job_name: str,
        namespace: str,
        rank: int,
        registry: CollectorRegistry | None = None,
        *,
        process_metrics: bool = True,
        world_size: int | None = None,
        histogram_max_ranks: int | None = None,
    ) -> None:
        """world_size and histogram_max_ranks default to $WORLD_SIZE (else 1) and
        $FINETUNE_METRICS_HISTOGRAM_MAX_RANKS (else HISTOGRAM_MAX_RANKS)."""
        if world_size is None:
            world_size = _env_int("WORLD_SIZE", 1)
        if histogram_max_ranks is None:
            histogram_max_ranks = _env_int(HISTOGRAM_MAX_RANKS_ENV, HISTOGRAM_MAX_RANKS)
        self.histograms = exports_histograms(rank, world_size, histogram_max_ranks)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.labels: dict[str, str] = {
            "finetunejob": job_name,
            "namespace": namespace,
            "rank": str(rank),
        }
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self._window: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_WINDOW)
        self._lock = threading.Lock()
        self._status: str | None = None
        # Phase stamps (Unix seconds) as recorded, for the result; the gauge exports the same.
        self._phases: dict[str, float] = {}
        self._last_step_at: float | None = None
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, (*LABELS, *extra), registry=r)

        self._step = gauge("finetune_train_step", "Last completed optimizer step.")
        self._total_steps = gauge("finetune_train_total_steps", "Optimizer steps planned.")
        self._epoch = gauge("finetune_train_epoch", "Fractional epoch of the last step.")
        self._loss = gauge("finetune_train_loss", "Training loss of the last optimizer step.")
        self._lr = gauge("finetune_train_learning_rate", "Learning rate of the last step.")
        self._grad_norm = gauge(
            "finetune_train_grad_norm", "Gradient L2 norm of the last step, before clipping."
        )
        self._tokens = Counter(
            "finetune_train_tokens", "Tokens this rank trained on.", LABELS, registry=r
        )
        self._samples = Counter(
            "finetune_train_samples", "Examples this rank trained on.", LABELS, registry=r
        )
        self._tps = gauge(
            "finetune_train_tokens_per_second",
            f"Training tokens per second of this rank over the last {THROUGHPUT_WINDOW} steps.",
        )
        # None on the ranks that export no histograms (see exports_histograms).
        self._step_duration: Histogram | None = None
        self._ckpt_duration: Histogram | None = None
        if self.histograms:
            self._step_duration = Histogram(
                "finetune_train_step_duration_seconds",
                "Wall time of one optimizer step (all micro-batches), in seconds.",
                LABELS,
                registry=r,
                buckets=STEP_DURATION_BUCKETS,
            )
            self._ckpt_duration = Histogram(
                "finetune_checkpoint_save_duration_seconds",
                "Wall time to save one checkpoint, in seconds.",
                LABELS,
                registry=r,
                buckets=CHECKPOINT_BUCKETS,
            )
        self._last_step = gauge(
            "finetune_train_last_step_timestamp_seconds",
            "Unix time the last optimizer step finished; alert on time() minus this for stalls.",
        )
        self._flops = gauge(
            "finetune_train_achieved_flops_per_second",
            "Model FLOPs per second this rank achieves (see flops_per_token).",
        )
        self._mfu = gauge(
            "finetune_train_model_flops_utilization_ratio",
            "Achieved model FLOPs over the accelerator's peak FLOPs, 0..1.",
        )
        self._eval = gauge(
            "finetune_eval_score", "Evaluation score by metric, before or after training.",
            ("metric", "stage"),
        )  # fmt: skip
        self._ckpt_last = gauge(
            "finetune_checkpoint_last_timestamp_seconds", "Unix time the last checkpoint was saved."
        )
        self._resumed_from = gauge(
            RESUMED_FROM_STEP_GAUGE,
            "Step this gang resumed from, 0 for a fresh start.",
        )
        self._resumed_at = gauge(
            RESUMED_TIMESTAMP_GAUGE,
            "Unix time this gang resumed from that step (or started afresh).",
        )
        self._store_free = gauge(
            "finetune_checkpoint_store_free_bytes",
            "Bytes free in the checkpoint store after the last checkpoint was saved.",
        )
        self._ckpt_size = gauge(
            "finetune_checkpoint_size_bytes", "Bytes the last checkpoint takes in its store."
        )
        self._stop = gauge(
            STOP_SECONDS_GAUGE,
            "Seconds a stop (SIGTERM) would take to end its step and save a checkpoint: the "
            "longest of the recent steps plus the last save (its Hub upload included).",
        )
        self._grace = gauge(
            GRACE_PERIOD_GAUGE,
            "The pods' terminationGracePeriodSeconds, in which a stop's step and save must fit.",
        )
        self._mirror_stale = gauge(
            "finetune_checkpoint_mirror_stale",
            "1 while the newest checkpoint failed to mirror to the Hub branch, else 0.",
        )
        self._peak_memory = gauge(
            "finetune_accelerator_memory_peak_bytes",
            "Peak accelerator memory allocated by this rank, in bytes.",
        )
        self._phase = gauge(
            phases.PHASE_GAUGE,
            "Unix time this rank reached a phase before its first step or after its last one.",
            ("phase",),
        )
        self._status_gauge = gauge(
            "finetune_trainer_status", "1 for the trainer's current status, 0 for past ones.",
            ("status",),
        )  # fmt: skip
        if process_metrics:
            # Own registry means no default collectors; add them so CPU, RSS and GC show here too.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        # Touch the label sets so that every series exists (at 0) from the first scrape, and
        # `rate()`/`increase()` see the counters' start.
        for metric in (self._tokens, self._samples, self._step_duration, self._ckpt_duration):
            if metric is not None:
                metric.labels(**self.labels)
        self.record_phase(phases.PROCESS_STARTED)

    # ---- serving ----------------------------------------------------------------------------

    def start_server(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on addr:port in a daemon thread; port 0 picks a free one. Returns it."""
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop_server(self) -> None:
        """Stop the server started by start_server, if any."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ---- recording ----------------------------------------------------------------------------

    def record_step(
        self,
        step: int,
        epoch: float,
        loss: float,
        learning_rate: float,
        grad_norm: float | None,
        tokens: int,
        samples: int,
        duration_s: float,
        total_steps: int,
    ) -> None:
        """Record one optimizer step. tokens/samples are this rank's for this step only.

        The first call also records the `first_step` start-up phase, unless it was recorded.
        """
        lb = self.labels
        self._step.labels(**lb).set(step)
        self._total_steps.labels(**lb).set(total_steps)
        self._epoch.labels(**lb).set(epoch)
        self._loss.labels(**lb).set(loss)
        self._lr.labels(**lb).set(learning_rate)
        if grad_norm is not None:
            self._grad_norm.labels(**lb).set(grad_norm)
        if tokens > 0:
            self._tokens.labels(**lb).inc(tokens)
        if samples > 0:
            self._samples.labels(**lb).inc(samples)
        if duration_s >= 0:
            if self._step_duration is not None:
                self._step_duration.labels(**lb).observe(duration_s)
            with self._lock:
                self._window.append((max(tokens, 0), duration_s))
                seconds = sum(d for _, d in self._window)
                tps = sum(t for t, _ in self._window) / seconds if seconds > 0 else 0.0
            self._tps.labels(**lb).set(tps)
        now = time.time()
        self._last_step.labels(**lb).set(now)
        self._last_step_at = now
        if phases.FIRST_STEP not in self._phases:
            self.record_phase(phases.FIRST_STEP, at=now)

    @property
    def tokens_per_second(self) -> float:
        """This rank's smoothed throughput, as exported; 0 before the first step."""
        with self._lock:
            seconds = sum(d for _, d in self._window)
            return sum(t for t, _ in self._window) / seconds if seconds > 0 else 0.0

    def record_eval(self, stage: Literal["before", "after"], scores: dict[str, float]) -> None:
        """Export evaluation scores; None and NaN scores are skipped (an absent series)."""
        if stage not in ("before", "after"):
            raise ValueError(f"stage must be 'before' or 'after', not {stage!r}")
        for metric, value in scores.items():
            if value is None or math.isnan(value):
                continue
            self._eval.labels(**self.labels, metric=metric, stage=stage).set(value)

    def record_checkpoint(self, duration_s: float) -> None:
        if self._ckpt_duration is not None:
            self._ckpt_duration.labels(**self.labels).observe(duration_s)
        self._ckpt_last.labels(**self.labels).set(time.time())

    def record_store(self, size: int, free: int) -> None:
        """The last checkpoint's size and the room left beside it (rank 0, which saves): with
        less room than one checkpoint takes, the next save must first delete older ones."""
        self._ckpt_size.labels(**self.labels).set(size)
        self._store_free.labels(**self.labels).set(free)

    def record_stop(self, seconds: float, grace: float) -> None:
        """What a stop would take now (the longest recent step and the last save), and the grace
        period it has."""
        self._stop.labels(**self.labels).set(seconds)
        self._grace.labels(**self.labels).set(grace)

    def record_resume(self, step: int | None) -> None:
        """The step this gang resumed from, and when; None (a fresh start) is exported as 0."""
        self._resumed_from.labels(**self.labels).set(step or 0)
        self._resumed_at.labels(**self.labels).set(time.time())

    def record_mirror(self, stale: bool) -> None:
        """Whether the Hub branch lags the newest local checkpoint (its upload failed)."""
        self._mirror_stale.labels(**self.labels).set(1 if stale else 0)

    def record_phase(self, name: str, at: float | None = None) -> None:
        """Stamp a phase (finetune_api.phases) with the Unix time `at`, by default now.

        process_started is stamped on construction, first_step by the first record_step unless
        recorded before. Other names are accepted, for phases that a trainer adds. Recording a
        phase again moves its stamp.
        """
        at = time.time() if at is None else at
        self._phases[name] = at
        self._phase.labels(**self.labels, phase=name).set(at)

    def record_last_step(self) -> None:
        """Stamp last_step with the time the last record_step finished; nothing without one
        (an attempt that only pushes what an earlier one trained)."""
        if self._last_step_at is not None:
            self.record_phase(phases.LAST_STEP, at=self._last_step_at)

    @property
    def phases(self) -> dict[str, float]:
        """The stamps recorded so far (Unix seconds, to the millisecond), for the result."""
        return {name: round(at, 3) for name, at in self._phases.items()}

    def record_peak_memory(self, bytes_: int) -> None:
        self._peak_memory.labels(**self.labels).set(bytes_)

    def record_flops(
        self, achieved_flops_per_second: float, peak_flops_per_second: float | None = None
    ) -> None:
        """Export achieved model FLOP/s (flops_per_token * tokens_per_second) and, given the
        accelerator's peak FLOP/s for the training precision, MFU = achieved / peak."""
        self._flops.labels(**self.labels).set(achieved_flops_per_second)
        if peak_flops_per_second:
            self._mfu.labels(**self.labels).set(achieved_flops_per_second / peak_flops_per_second)

    def set_status(self, phase: str) -> None:
        """Mark the trainer's current status (e.g. loading, training, evaluating, pushing)."""
        with self._lock:
            previous, self._status = self._status, phase
        if previous is not None and previous != phase:
            self._status_gauge.labels(**self.labels, status=previous).set(0)
        self._status_gauge.labels(**self.labels, status=phase).set(1)
