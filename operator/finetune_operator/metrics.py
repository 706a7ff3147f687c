"""The operator's own Prometheus metrics, served on their own port (default 8000)."""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from finetune_api.constants import Phase, Reason

FAILURE_REASONS = (
    Reason.INVALID_SPEC,
    Reason.APPLY_REJECTED,
    Reason.EVALUATION_GATE_FAILED,
    Reason.PUSH_FAILED,
    Reason.TRAINING_FAILED,
    Reason.BACKOFF_LIMIT_EXCEEDED,
    Reason.DEADLINE_EXCEEDED,
)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.jobs = Gauge(
            "finetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=registry
        )
        self.reconcile_duration = Histogram(
            "finetune_operator_reconcile_duration_seconds",
            "Time of one reconcile pass.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "finetune_operator_reconcile_errors_total",
            "Reconcile passes that raised.",
            ["kind"],
            registry=registry,
        )
        self.job_attempts = Counter(
            "finetune_operator_job_attempts_total",
            "batch Jobs created (first attempts and restarts).",
            registry=registry,
        )
        self.restarts = Counter(
            "finetune_operator_job_restarts_total",
            "Gang restarts after a retryable failure or a disruption.",
            registry=registry,
        )
        # Per reason (a closed set: the Reason constants), so alerts can tell a failed
        # evaluation gate from a crash without a per-job label.
        self.jobs_failed = Counter(
            "finetune_operator_jobs_failed_total",
            "FineTuneJobs that reached Failed, by condition reason.",
            ["reason"],
            registry=registry,
        )
        # Series that exist at 0 from the start let increase() see a reason's first failure.
        for reason in FAILURE_REASONS:
            self.jobs_failed.labels(reason=reason)
        self.time_to_running = Histogram(
            "finetune_operator_time_to_running_seconds",
            "From FineTuneJob creation to its first Running.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=registry,
        )
        self.restart_seconds = Histogram(
            "finetune_operator_restart_seconds",
            "From a gang's failure being seen (Restarting) to its next attempt training again, "
            "as rank 0 reports the step it resumed from.",
            buckets=(5, 10, 15, 20, 30, 45, 60, 120, 300, 600),
            registry=registry,
        )
        self._phases: dict[tuple[str, str], str] = {}

    def observe_phase(self, key: tuple[str, str], phase: str | None) -> None:
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        for p in Phase:
            self.jobs.labels(phase=str(p)).set(sum(1 for v in self._phases.values() if v == p))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
