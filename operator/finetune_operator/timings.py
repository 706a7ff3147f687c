"""Where an attempt's time went: `status.startup` and `status.finish`. Pure.

Two sources meet here. The pods say when the gang was scheduled, when its containers started and
when they ended (`pod_times`, from the pods the operator lists anyway). Rank 0 says when it
reached each phase of finetune_api.phases: live in its phase gauge (`scrape.parse_phases`), and
whole in its result (`TrainerResult.phases`). `derive` turns the stamps into seconds: from the
FineTuneJob's creation up to the first step, from the last step after it.

Stamps from the trainer are its node's clock; stamps from pods have the API server's one-second
resolution. A value that would be negative (clock skew) is written as 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from finetune_api import phases
from finetune_api.pod import CONTAINER_NAME

Obj = dict[str, Any]
# status times are rounded to this many decimals (a tenth of a second).
DIGITS = 1


def unix(timestamp: Any) -> float | None:
    """Unix seconds of an RFC 3339 timestamp; None for anything else."""
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rfc3339(seconds: float) -> str:
    """The RFC 3339 timestamp, to the second as Kubernetes writes them, of Unix seconds."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def later(a: str | None, b: str | None) -> bool:
    """Whether RFC 3339 time `a` is later than `b` (any time is later than none)."""
    ta, tb = unix(a), unix(b)
    return ta is not None and (tb is None or ta > tb)


def seconds_between(earlier: str | None, until: str) -> float | None:
    """Seconds from one RFC 3339 time to another, at least 0; None when either is unreadable."""
    a, b = unix(earlier), unix(until)
    if a is None or b is None:
        return None
    return max(b - a, 0.0)


def _container(pod: Obj) -> Obj:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            return cs.get("state") or {}
    return {}


def _scheduled(pod: Obj) -> float | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "True":
            return unix(cond.get("lastTransitionTime"))
    return None


def _started(pod: Obj) -> float | None:
    state = _container(pod)
    return unix((state.get("running") or state.get("terminated") or {}).get("startedAt"))


def _finished(pod: Obj) -> float | None:
    return unix((_container(pod).get("terminated") or {}).get("finishedAt"))


def _last(values: Iterable[float | None], gang: int) -> float | None:
    """The latest of one value per pod, once all `gang` pods have it: the gang waits for its
    last pod, and an earlier pod alone would tell too soon."""
    known = [v for v in values if v is not None]
    return max(known) if known and len(known) >= gang else None


def pod_times(pods: list[Obj], gang: int) -> dict[str, float]:
    """Unix seconds at which the last of the attempt's `gang` pods was scheduled, started its
    trainer container, and ended it (status field names)."""
    times = {
        phases.SCHEDULED: _last(map(_scheduled, pods), gang),
        phases.CONTAINER_STARTED: _last(map(_started, pods), gang),
        phases.PODS_EXITED: _last(map(_finished, pods), gang),
    }
    return {k: v for k, v in times.items() if v is not None}


def _since(start: float, at: float | None) -> float | None:
    return None if at is None else round(max(at - start, 0.0), DIGITS)


def derive(
    previous: Mapping[str, Any],
    *,
    created: str | None,
    attempt: int,
    pods: Mapping[str, float],
    stamps: Mapping[str, float],
    finished_at: str | None,
) -> tuple[Obj, Obj]:
    """status.startup and status.finish of `attempt`, from the previous status (whose values
    for the same attempt stay: a pod replaced later does not move the gang's start) and this
    pass's pod times, rank 0's phase stamps (Unix seconds) and when the job finished (RFC 3339;
    None while it runs)."""
    old_startup = dict(previous.get("startup") or {})
    old_finish = dict(previous.get("finish") or {})
    if old_startup.get("attempt") != attempt:
        old_startup, old_finish = {}, {}
    startup: Obj = {"attempt": attempt}
    finish: Obj = {"attempt": attempt}
    origin = unix(created)
    if origin is not None:
        fresh = {
            phases.SCHEDULED: _since(origin, pods.get(phases.SCHEDULED)),
            phases.CONTAINER_STARTED: _since(origin, pods.get(phases.CONTAINER_STARTED)),
            **{
                field: _since(origin, stamps.get(name))
                for name, field in phases.STARTUP_FIELDS.items()
            },
        }
        startup.update({k: v for k, v in fresh.items() if v is not None})
    startup.update({k: v for k, v in old_startup.items() if v is not None})
    last_step = stamps.get(phases.LAST_STEP)
    if last_step is not None:
        fresh = {
            **{
                field: _since(last_step, stamps.get(name))
                for name, field in phases.FINISH_FIELDS.items()
            },
            phases.PODS_EXITED: _since(last_step, pods.get(phases.PODS_EXITED)),
            phases.SUCCEEDED: _since(last_step, unix(finished_at)),
        }
        finish.update({k: v for k, v in fresh.items() if v is not None})
    finish.update({k: v for k, v in old_finish.items() if v is not None})
    return startup, finish
