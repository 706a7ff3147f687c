"""The operator's own Prometheus metrics, served on their own port (default 8000).

Most series are operator-wide. Two families name the FineTuneJob, so that alerts can say which
job failed, restarts or cannot start: `finetune_operator_job_status` and
`finetune_operator_job_attempt`. They are bounded: one series each per FineTuneJob that exists
and has not finished, or finished less than `finished_seconds` (default an hour) ago. They are
built at scrape time from the last status each job's pass wrote, so a finished job's series
go away on time even when no pass runs, and a restarted operator does not bring back jobs that
finished long ago (the grace period runs from `status.completionTime`).

Two more name each checkpoint claim the operator kept when its FineTuneJob ended (or was deleted
before) and no FineTuneJob has adopted since (`finetune_operator_retained_claim_bytes` and
`..._timestamp_seconds`): storage that outlives its job by design, until someone resumes from
it or deletes it, which FineTuneCheckpointClaimRetained reminds of. One series each per such
claim, from a watch of the operator's claims.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from finetune_api.constants import ConditionType, Phase, Reason
from finetune_api.result import PERMANENT_REASONS
from finetune_operator.checkpoints import RetainedClaim
from finetune_operator.timings import unix

FAILURE_REASONS = (
    # The trainer's permanent verdicts (the Failed condition carries them as they are).
    *PERMANENT_REASONS,
    # The operator's own.
    Reason.APPLY_REJECTED,
    Reason.NAME_CONFLICT,
    Reason.OOM_KILLED,
    Reason.PUSH_FAILED,
    Reason.TRAINING_FAILED,
    Reason.PENDING_TIMEOUT,
    Reason.BACKOFF_LIMIT_EXCEEDED,
    Reason.DEADLINE_EXCEEDED,
)
# finetune_operator_job_restarts_total's `cause`: a retryable failure spends runPolicy.backoffLimit,
# a disruption does not (status.disruptions).
RESTART_CAUSES = ("failure", "disruption")
# How long a finished FineTuneJob keeps its per-job series: long enough for a few scrapes and
# rule evaluations to see how it ended (FineTuneJobFailed fires for this long), short enough
# that a cluster with many finished jobs does not accumulate series.
FINISHED_SECONDS = 3600.0
JOB_LABELS = ("namespace", "finetunejob")
# The condition whose reason explains each phase. Pending has no condition of its own: the
# Running condition (False) says why the pods do not run (Unschedulable, Queued, Restarting...).
PHASE_CONDITION = {
    Phase.FAILED: ConditionType.FAILED,
    Phase.SUCCEEDED: ConditionType.SUCCEEDED,
    Phase.SUSPENDED: ConditionType.SUSPENDED,
    Phase.RUNNING: ConditionType.RUNNING,
    Phase.PENDING: ConditionType.RUNNING,
}
TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)


@dataclass(frozen=True)
class JobState:
    """What the per-job series say about one FineTuneJob."""

    phase: str
    reason: str
    attempt: int
    # Unix time the job finished; None while it has not.
    finished_at: float | None = None


def job_state(status: Mapping[str, Any], before: JobState | None, now: float) -> JobState:
    """The JobState of a status as a pass wrote it (camelCase, as the API server holds it).

    A finished job's end is its completionTime, else its Failed/Succeeded condition's
    transition, else when this operator first saw it finished.
    """
    phase = str(status.get("phase") or Phase.PENDING)
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    condition = conditions.get(PHASE_CONDITION.get(phase, ""), {})
    finished_at = None
    if phase in TERMINAL:
        finished_at = unix(status.get("completionTime")) or unix(
            condition.get("lastTransitionTime")
        )
        if finished_at is None:
            finished_at = before.finished_at if before and before.finished_at else now
    return JobState(
        phase=phase,
        reason=str(condition.get("reason") or ""),
        attempt=int(status.get("attempts") or 0),
        finished_at=finished_at,
    )


class _ScrapeTimeSeries(Collector):
    """Gauge families built at scrape time by `build(filled)`: empty for describe (names only,
    so registering does not take a snapshot), filled from a snapshot for collect."""

    def __init__(self, build: Callable[[bool], list[GaugeMetricFamily]]) -> None:
        self._build = build

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._build(False)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._build(True)


def _job_families(
    snapshot: Callable[[], dict[tuple[str, str], JobState]], filled: bool
) -> list[GaugeMetricFamily]:
    status = GaugeMetricFamily(
        "finetune_operator_job_status",
        "1 for each FineTuneJob's current phase, with the reason of the condition behind "
        "it; one series per job, kept for an hour after it finished.",
        labels=[*JOB_LABELS, "phase", "reason"],
    )
    attempt = GaugeMetricFamily(
        "finetune_operator_job_attempt",
        "Each FineTuneJob's status.attempts: the attempt (batch Job) it is on.",
        labels=list(JOB_LABELS),
    )
    for (namespace, name), state in sorted(snapshot().items()) if filled else ():
        status.add_metric([namespace, name, state.phase, state.reason], 1)
        attempt.add_metric([namespace, name], state.attempt)
    return [status, attempt]


def _retained_claim_families(
    snapshot: Callable[[], list[RetainedClaim]], filled: bool
) -> list[GaugeMetricFamily]:
    labels = ["namespace", "persistentvolumeclaim", "finetunejob"]
    size = GaugeMetricFamily(
        "finetune_operator_retained_claim_bytes",
        "Each checkpoint claim the operator kept past its FineTuneJob "
        "(output.checkpoints.claimRetentionPolicy) that no FineTuneJob has adopted since: its "
        "capacity (what it requests until bound).",
        labels=labels,
    )
    since = GaugeMetricFamily(
        "finetune_operator_retained_claim_timestamp_seconds",
        "When each kept checkpoint claim was released from its FineTuneJob (Unix seconds).",
        labels=labels,
    )
    for claim in snapshot() if filled else ():
        names = [claim.namespace, claim.name, claim.job_name]
        size.add_metric(names, claim.size_bytes)
        since.add_metric(names, claim.since)
    return [size, since]


class OperatorMetrics:
    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        finished_seconds: float = FINISHED_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        # client-go controllers export the same as leader_election_master_status.
        self.leader = Gauge(
            "finetune_operator_leader",
            "1 while this operator acts on FineTuneJobs (it holds the Lease, or runs without "
            "leader election); 0 while it stands by for the Lease.",
            registry=registry,
        )
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
            "Gang restarts, by cause: a retryable failure (counted against backoffLimit) or a "
            "disruption (an eviction, a deleted pod, a lost node: not counted).",
            ["cause"],
            registry=registry,
        )
        for cause in RESTART_CAUSES:
            self.restarts.labels(cause=cause)
        # Per reason (a closed set: the Reason constants), for rates across all jobs; the
        # per-job series below name the jobs.
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
        # Once per attempt, when its status first shows the first step (or the end): where the
        # time to it went, by status.startup (status.finish) field.
        self.startup_seconds = Histogram(
            "finetune_operator_startup_phase_seconds",
            "From FineTuneJob creation to each phase before the first step (status.startup).",
            ["phase"],
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.finish_seconds = Histogram(
            "finetune_operator_finish_phase_seconds",
            "From the last step to each phase after it (status.finish).",
            ["phase"],
            buckets=(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.finished_seconds = finished_seconds
        self._clock = clock
        # Written by reconcile passes (the event loop), read by the scrape thread.
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str], JobState] = {}
        # Written by the claim watch (the event loop), read by the scrape thread.
        self._claims: dict[tuple[str, str], RetainedClaim] = {}
        registry.register(_ScrapeTimeSeries(partial(_job_families, self.live_jobs)))
        registry.register(_ScrapeTimeSeries(partial(_retained_claim_families, self.kept_claims)))

    def observe_job(self, key: tuple[str, str], status: Mapping[str, Any] | None) -> None:
        """Record the status a pass wrote for FineTuneJob `key` (namespace, name); None: the
        job is gone. Feeds the per-phase counts and the per-job series."""
        with self._lock:
            if status is None:
                self._states.pop(key, None)
            else:
                self._states[key] = job_state(status, self._states.get(key), self._clock())
            phases = Tally(s.phase for s in self._states.values())
        for p in Phase:
            self.jobs.labels(phase=str(p)).set(phases[p])

    def observe_restart(self, previous: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """One gang restart, which this status write records: a disruption when it counted one
        (status.disruptions went up), else a failure."""
        more = int(status.get("disruptions") or 0) > int(previous.get("disruptions") or 0)
        self.restarts.labels(cause="disruption" if more else "failure").inc()

    def observe_timings(self, previous: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """Observe status.startup when its firstStep first appears, and status.finish when its
        `succeeded` does: once per attempt each."""
        for name, histogram, last in (
            ("startup", self.startup_seconds, "firstStep"),
            ("finish", self.finish_seconds, "succeeded"),
        ):
            new, old = status.get(name) or {}, previous.get(name) or {}
            if new.get(last) is None:
                continue
            if old.get(last) is not None and old.get("attempt") == new.get("attempt"):
                continue
            for phase, seconds in new.items():
                if phase != "attempt" and isinstance(seconds, int | float):
                    histogram.labels(phase=phase).observe(seconds)

    def observe_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """observe_job for a caller that knows only the phase (None: the job is gone)."""
        self.observe_job(key, None if phase is None else {"phase": phase})

    def live_jobs(self) -> dict[tuple[str, str], JobState]:
        """The jobs that have per-job series now: unfinished, or finished within the grace."""
        horizon = self._clock() - self.finished_seconds
        with self._lock:
            return {
                key: state
                for key, state in self._states.items()
                if state.finished_at is None or state.finished_at > horizon
            }

    def observe_claim(self, key: tuple[str, str], claim: RetainedClaim | None) -> None:
        """Record what checkpoint claim `key` (namespace, name) is now: kept (a RetainedClaim),
        or held by a FineTuneJob or gone (None)."""
        with self._lock:
            if claim is None:
                self._claims.pop(key, None)
            else:
                self._claims[key] = claim

    def kept_claims(self) -> list[RetainedClaim]:
        with self._lock:
            return [self._claims[key] for key in sorted(self._claims)]

    def serve(self, port: int) -> None:
        """Serve the registry on `port`, from the operator's start: a standby is scraped too."""
        start_http_server(port, registry=self.registry)
