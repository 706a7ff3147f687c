"""status.serve, derived purely from the job's status, its serving Deployment and the smoke test.

Promotion: a revision is served only once the job Succeeded, which it does only when its
evaluation gates passed and the push made that revision (status.result.revision).
`status.serve.revision` names a revision only after its rollout completed (every replica
updated and available) and a smoke chat completion sent through the Service answered. Until
then it keeps naming the previous one: while a rollout is under way, or after it failed (the
Deployment's progress deadline passed), the old pods keep serving, because the rolling update
never takes one away before its replacement is Ready (maxUnavailable 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from finetune_api.constants import Phase
from finetune_api.v1alpha1 import FineTuneJob
from finetune_operator import naming, serve

Obj = dict[str, Any]


class ServeReason(StrEnum):
    WAITING = "Waiting"
    ROLLING_OUT = "RollingOut"
    SERVING = "Serving"
    SMOKE_FAILED = "SmokeFailed"
    ROLLOUT_FAILED = "RolloutFailed"
    NAME_CONFLICT = "NameConflict"
    # A ResourceQuota of the namespace refused the Deployment or the Service; tried again.
    QUOTA_EXCEEDED = "QuotaExceeded"


# Reasons worth a Warning Event: someone has to look.
WARNING_REASONS = frozenset(
    {ServeReason.SMOKE_FAILED, ServeReason.ROLLOUT_FAILED, ServeReason.QUOTA_EXCEEDED}
)


@dataclass(frozen=True)
class Target:
    """What should be served: the pushed revision and what kind of artifact it is."""

    revision: str
    artifact: str


def target(job: FineTuneJob) -> Target | None:
    """The revision to serve, or None until the job has Succeeded with a pushed revision."""
    status = job.status
    if job.spec.serve is None or status is None or status.phase != Phase.SUCCEEDED:
        return None
    if not status.result.revision:
        return None
    return Target(status.result.revision, status.result.artifact)


def unapplied(job: FineTuneJob) -> bool:
    """Whether there is a revision to serve and nothing was applied for it yet (status.serve
    still waits for the job, or a quota refused it): the pass that saw the job succeed, or the
    follow-up after a quota's refusal, makes the Deployment, whose events then bring the passes
    that follow its rollout."""
    if target(job) is None:
        return False
    served = job.status.serve if job.status is not None else None
    return served is None or served.reason in (ServeReason.WAITING, ServeReason.QUOTA_EXCEEDED)


@dataclass(frozen=True)
class Rollout:
    """The serving Deployment as its controller reports it."""

    revision: str | None
    complete: bool
    failed: bool
    available: int
    message: str


def read_rollout(deployment: Obj | None) -> Rollout | None:
    """The rollout of a Deployment read back from the API server (None: there is none)."""
    if deployment is None:
        return None
    meta, spec = deployment.get("metadata") or {}, deployment.get("spec") or {}
    status = deployment.get("status") or {}
    annotations = (spec.get("template") or {}).get("metadata", {}).get("annotations") or {}
    want = int(spec.get("replicas", 1))
    available = int(status.get("availableReplicas") or 0)
    observed = int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    complete = (
        observed
        and int(status.get("updatedReplicas") or 0) == want
        and int(status.get("replicas") or 0) == want
        and available == want
        and not status.get("unavailableReplicas")
    )
    failed, message = False, ""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            failed = cond.get("reason") == "ProgressDeadlineExceeded"
            message = str(cond.get("message") or "")
    return Rollout(
        revision=annotations.get(naming.ANNOTATION_SERVE_REVISION),
        complete=complete and not failed,
        failed=failed and observed,
        available=available,
        message=message,
    )


def needs_smoke(previous: Obj | None, want: Target | None, rollout: Rollout | None) -> bool:
    """Whether this pass sends the smoke request: the rollout of the wanted revision completed,
    and it has not yet answered one since (a resync of a serving job sends none)."""
    if want is None or rollout is None or not rollout.complete or rollout.revision != want.revision:
        return False
    previous = previous or {}
    return not (
        previous.get("ready")
        and previous.get("revision") == want.revision
        and previous.get("reason") == ServeReason.SERVING
    )


@dataclass(frozen=True)
class Smoke:
    """The smoke chat completion's outcome: ok, or why not."""

    ok: bool
    message: str = ""


def derive(
    job: FineTuneJob,
    rollout: Rollout | None,
    smoke: Smoke | None,
    now: str,
    blocked: tuple[ServeReason, str] | None = None,
) -> Obj | None:
    """The next status.serve (wire names), or None when the job serves nothing."""
    spec = job.spec.serve
    if spec is None:
        return None
    previous: Obj = {}
    if job.status is not None and job.status.serve is not None:
        previous = job.status.serve.model_dump(mode="json", by_alias=True, exclude_none=True)
    want = target(job)
    out: Obj = {
        "engine": spec.engine,
        "url": serve.serve_url(job),
        "model": serve.served_model(job),
        "revision": previous.get("revision"),
        "replicas": rollout.available if rollout else 0,
    }
    # The revision named so far stays served while some old pod still answers.
    still = bool(previous.get("ready")) and rollout is not None and rollout.available > 0
    if want is not None and blocked is not None:
        # A name held by someone else, a quota, or a render the API server refused.
        reason, message = blocked
        ready = still
    elif want is None:
        reason, ready = ServeReason.WAITING, False
        message = "serving starts once the job has Succeeded and pushed a revision"
        if job.status is not None and job.status.phase == Phase.FAILED:
            message = "the job Failed (a missed gate pushes nothing): there is nothing to serve"
    elif rollout is None or (not rollout.complete and not rollout.failed):
        reason, ready = ServeReason.ROLLING_OUT, still
        message = f"rolling out revision {want.revision}"
    elif rollout.failed:
        reason, ready = ServeReason.ROLLOUT_FAILED, still
        message = f"the rollout of revision {want.revision} failed: {rollout.message}"
        if still:
            message += f"; revision {previous.get('revision')} is still serving"
    elif smoke is not None and not smoke.ok:
        reason, ready = ServeReason.SMOKE_FAILED, False
        message = f"revision {want.revision} rolled out, but the smoke request failed: "
        message += smoke.message
    elif smoke is not None or not needs_smoke(previous, want, rollout):
        reason, ready = ServeReason.SERVING, True
        out["revision"] = want.revision
        message = f"serving revision {want.revision} with {spec.engine}"
    else:  # rolled out; the smoke request has not been sent yet
        reason, ready = ServeReason.ROLLING_OUT, still
        message = f"revision {want.revision} rolled out; smoke request pending"
    out.update(reason=str(reason), ready=ready, message=message[:4096])
    changed = previous.get("reason") != out["reason"] or previous.get("ready") != ready
    out["lastTransitionTime"] = now if changed else previous.get("lastTransitionTime", now)
    return {k: v for k, v in out.items() if v is not None}
