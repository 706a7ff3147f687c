"""Classify what the cluster shows for one attempt, and decide the next step. Pure.

`observe_job` turns a batch Job and its pods into an `Outcome`; `next_action` compares that with
the FineTuneJob's wishes and the attempt counter and says what the operator should do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from finetune_operator import naming
from finetune_operator.api.constants import PERMANENT_EXIT_CODES, ExitCode, Reason
from finetune_operator.termination import TrainerResult, parse_termination_message

Obj = dict[str, Any]
_EXIT_CODE_IN_MESSAGE = re.compile(r"exit code (\d+)")


class State(StrEnum):
    ABSENT = "Absent"
    SUSPENDED = "Suspended"
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Outcome:
    state: State
    attempt: int = 0
    uid: str | None = None
    # Set for FAILED: whether a new attempt could help, and why not.
    permanent: bool = False
    reason: str = ""
    message: str = ""
    result: TrainerResult | None = None
    running_pods: int = 0
    rank0_ip: str | None = None
    deleting: bool = False


def _true_conditions(job: Obj) -> dict[str, Obj]:
    conds = (job.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conds if c.get("status") == "True"}


def _index(pod: Obj) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(naming.COMPLETION_INDEX) or (
        meta.get("labels") or {}
    ).get(naming.COMPLETION_INDEX, "-1")
    try:
        return int(raw)
    except ValueError:
        return -1


def _terminated(pod: Obj) -> Obj | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == naming.CONTAINER_NAME:
            return (cs.get("state") or {}).get("terminated")
    return None


def _permanent_reason(code: int) -> str:
    return Reason.INVALID_SPEC if code == ExitCode.INVALID_SPEC else Reason.EVALUATION_GATE_FAILED


def _trainer_result(pods: list[Obj]) -> TrainerResult | None:
    """Rank 0 writes the result; fall back to any pod's message if rank 0's is unreadable."""
    for pod in sorted(pods, key=_index):
        term = _terminated(pod)
        result = parse_termination_message(term.get("message")) if term else None
        if result is not None:
            return result
    return None


def _failure(job: Obj, cond: Obj, pods: list[Obj], base: Outcome) -> Outcome:
    result = _trainer_result(pods)
    codes = [t.get("exitCode") for p in pods if (t := _terminated(p)) and t.get("exitCode")]
    permanent_codes = [c for c in codes if c in PERMANENT_EXIT_CODES]
    job_reason = cond.get("reason", "")
    job_message = cond.get("message", "")
    if not permanent_codes and job_reason == "PodFailurePolicy":
        # The failed pods may already be gone; the Job's message still names the exit code.
        m = _EXIT_CODE_IN_MESSAGE.search(job_message)
        if m and int(m.group(1)) in PERMANENT_EXIT_CODES:
            permanent_codes = [int(m.group(1))]
    if permanent_codes:
        reason = _permanent_reason(permanent_codes[0])
        if result is not None and result.reason in (
            Reason.INVALID_SPEC,
            Reason.EVALUATION_GATE_FAILED,
        ):
            reason = result.reason
        message = (result.message if result and result.message else "") or (
            f"trainer exited with code {permanent_codes[0]}"
        )
        return _replace(
            base, state=State.FAILED, permanent=True, reason=reason, message=message, result=result
        )
    if result is not None and result.message:
        message = result.message
    elif codes:
        # Not a result document: with FallbackToLogsOnError it is the log tail, worth a glance.
        failed = (t for p in pods if (t := _terminated(p)) and t.get("exitCode"))
        tail = next((t.get("message") or "" for t in failed), "")
        message = f"exit code {codes[0]}" + (f": {tail.strip()[-256:]}" if tail.strip() else "")
    else:
        message = job_message
    detail = f"{job_reason}: {message}" if job_reason else message
    return _replace(
        base,
        state=State.FAILED,
        reason=Reason.TRAINING_FAILED,
        message=detail[:1024],
        result=result,
    )


def _replace(base: Outcome, **changes: Any) -> Outcome:
    return replace(base, **changes)


def observe_job(job: Obj | None, pods: list[Obj]) -> Outcome:
    if job is None:
        return Outcome(State.ABSENT)
    meta = job.get("metadata") or {}
    base = Outcome(State.PENDING, attempt=naming.attempt_of(job), uid=meta.get("uid"))
    if meta.get("deletionTimestamp"):
        # Foreground deletion keeps the Job until its pods are gone: wait, never act on it.
        return _replace(base, deleting=True)
    conds = _true_conditions(job)
    if "Complete" in conds:
        result = _trainer_result(pods)
        if result is not None and result.status == "Failed":
            return _replace(
                base,
                state=State.FAILED,
                permanent=True,
                reason=result.reason or Reason.TRAINING_FAILED,
                message=result.message or "",
                result=result,
            )
        return _replace(
            base, state=State.SUCCEEDED, reason=Reason.TRAINING_COMPLETED, result=result
        )
    for kind in ("Failed", "FailureTarget"):
        if kind in conds:
            return _failure(job, conds[kind], pods, base)
    if (job.get("spec") or {}).get("suspend"):
        return _replace(base, state=State.SUSPENDED)
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    rank0 = next((p for p in running if _index(p) == 0), None)
    ip = (rank0.get("status") or {}).get("podIP") if rank0 else None
    state = State.RUNNING if running else State.PENDING
    return _replace(base, state=state, running_pods=len(running), rank0_ip=ip)


# ---- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    kind: str  # "create" | "delete" | "patch"
    attempt: int = 0
    uid: str | None = None
    patch: Obj = field(default_factory=dict)


def job_patch(spec_job: Obj, run_policy: Any) -> Obj:
    """The mutable Job fields that drifted from runPolicy (a merge patch), or {}."""
    spec = spec_job.get("spec") or {}
    want: Obj = {
        "activeDeadlineSeconds": run_policy.active_deadline_seconds,
        "ttlSecondsAfterFinished": run_policy.ttl_seconds_after_finished,
    }
    # Kueue owns .spec.suspend of a queued Job; fighting it would evict the workload.
    if not run_policy.queue_name:
        want["suspend"] = bool(run_policy.suspend)
    return {k: v for k, v in want.items() if spec.get(k) != v and not (v is None and k not in spec)}
