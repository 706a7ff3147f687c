"""The operator's queue of passes: every pass that a watch event or the clock asks for, for all
FineTuneJobs, from one loop. As controller-runtime's workqueue, a key is queued, not its
object: events that arrive together for one FineTuneJob make one pass, and a key whose pass is
running stays queued until that pass ends, so a change it may have missed gets a pass of its own.

Why a pass is asked for:
- **soon**: a watch event of a child or a related object (a Job, a pending pod, a Kueue
  Workload) moved. The handler returns at once: an awaited pass would hold the event's body
  (a pod's is several KB) for as long as the pass waits its turn, and a burst queues thousands.
  A finished FineTuneJob's status is final, so only its serving Deployment's events ask.
- **follow-up**: a pass asked for another one later (`Plan.requeue_after`, as controller-runtime's
  `RequeueAfter`): `runPolicy.pendingTimeoutSeconds` runs out at a moment only the clock knows.
  One per object, replaced by every later pass: the latest pass saw the latest state.
- **waiting**: the Job is held back by something the operator cannot watch (a Secret), so it
  looks again every `waiting_seconds`.
- **progress**: a Running gang's rank 0 is scraped every `progress_seconds`.
- **resync**: every object is passed over every `resync_seconds`, because lost watch events
  (kopf#1276, #955) would otherwise leave its status stale for good. Past
  `RESYNC_PASSES_PER_SECOND` objects a second the interval stretches instead (2,000 objects:
  every 200 s): a pass reads the object, its Job, pods and children, and at 2,000 objects a
  60 s resync was 33 such passes a second, the API server's main load on a small control plane
  and what slowed the passes that events ask for (benchmarks/operator_scale.py).

kopf timers did the last three before. kopf keeps a task and a live copy of the body per object
and timer, so 2,000 objects cost 6,000 tasks and their bodies; and objects created in one burst
had their timers fire in one wave. Here an object costs a key, a few flags and due times,
learned from the watch events that every object sends anyway, and each object's periodic passes
are spread over their interval by a stable hash of its key.

`Clock` is pure (the caller passes the time); `run` is the loop around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
Key = tuple[str, str]
# How often the loop looks for due passes when no event wakes it. Finer buys nothing: the
# shortest interval (progress) is ten times it.
TICK_SECONDS = 1.0
# The first resync of an object comes no sooner than this after it is first seen: the create or
# resume pass has just looked at it.
RESYNC_INITIAL_SECONDS = 30.0
# The most resync passes a second, over all objects (controller-runtime's default resync is
# every 10 hours; this one is a safety net too, not how the operator learns of changes).
RESYNC_PASSES_PER_SECOND = 10.0


@dataclass(frozen=True)
class Due:
    """One pass asked for; several reasons due at once for one object merge into one."""

    key: Key
    # Read rank 0's metrics (progress).
    scrape: bool = False
    # Read and converge the children too (waiting, resync); an event, a follow-up or a progress
    # read only needs the Job and its pods.
    children: bool = False
    # Read the serving Deployment (spec.serve): its own event asked, or the children are read.
    serve: bool = False
    # Asked for by the clock alone (no event): such passes yield to the others.
    periodic: bool = True


@dataclass
class _Entry:
    running: bool
    waiting: bool
    progress_at: float
    waiting_at: float
    resync_at: float
    follow_up_at: float | None = None
    # Succeeded or Failed: its status is final, so a child's event asks it nothing.
    finished: bool = False


def _asked_by_events(entry: _Entry, serve: bool) -> bool:
    """Whether events asked this object a pass: any event of an unfinished one; of a finished
    one, only its serving Deployment's (its status is final)."""
    return serve or not entry.finished


def _phase(key: Key) -> float:
    """Where in each interval this object's periodic passes fall, in [0, 1): stable for a key,
    and spread over keys."""
    return zlib.crc32("/".join(key).encode()) / 2**32


class Clock:
    def __init__(
        self, *, resync_seconds: float, progress_seconds: float, waiting_seconds: float
    ) -> None:
        self.resync_seconds = resync_seconds
        self.progress_seconds = progress_seconds
        self.waiting_seconds = waiting_seconds
        self._entries: dict[Key, _Entry] = {}
        # Objects an event asked a pass for: kept apart, so that an event costs a look at its
        # own key, not at every object's due times.
        self._soon: set[Key] = set()
        # Of those, the ones whose serving Deployment's event asked.
        self._serve_soon: set[Key] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def resync_interval(self) -> float:
        """`resync_seconds`, stretched so that all objects' resyncs stay within
        RESYNC_PASSES_PER_SECOND."""
        return max(self.resync_seconds, len(self._entries) / RESYNC_PASSES_PER_SECOND)

    def track(
        self, key: Key, *, running: bool, waiting: bool, now: float, finished: bool = False
    ) -> None:
        """Record what the latest watch event says of an object; a new one gets its schedule."""
        entry = self._entry(key, now)
        if waiting and not entry.waiting:
            # Newly held back: the pass that found it has just looked.
            entry.waiting_at = now + self.waiting_seconds
        entry.running, entry.waiting, entry.finished = running, waiting, finished

    def forget(self, key: Key) -> None:
        self._entries.pop(key, None)
        self._soon.discard(key)
        self._serve_soon.discard(key)

    def soon(self, key: Key, now: float, *, serve: bool = False) -> None:
        """Ask for a pass as soon as the object has none running (a watch event moved);
        `serve`: the event was its serving Deployment's, so the pass reads that rollout."""
        self._entry(key, now)
        self._soon.add(key)
        if serve:
            self._serve_soon.add(key)

    def idle(self, due: Due) -> bool:
        """Whether `due` is an event's pass, nothing periodic merged in, for an object known
        finished by the time the pass is let run: at start-up the Jobs' listing can arrive
        before their FineTuneJobs', and queue a pass for every finished one (see `due`)."""
        entry = self._entries.get(due.key)
        quiet = not (due.periodic or due.scrape or due.children)
        return quiet and entry is not None and not _asked_by_events(entry, due.serve)

    def asked(self, key: Key) -> bool:
        """Whether an event asked for a pass of the object that has not run yet."""
        return key in self._soon

    def follow_up(self, key: Key, after: float | None, now: float) -> None:
        """Ask for one pass `after` seconds from `now`, replacing the object's earlier follow-up;
        None cancels it."""
        self._entry(key, now).follow_up_at = None if after is None else now + max(after, 0.0)

    def _entry(self, key: Key, now: float) -> _Entry:
        """The object's entry; one not tracked yet (its first event has not arrived) starts as
        neither running nor waiting, until its events say more."""
        entry = self._entries.get(key)
        if entry is None:
            phase = _phase(key)
            entry = self._entries[key] = _Entry(
                running=False,
                waiting=False,
                progress_at=now + phase * self.progress_seconds,
                waiting_at=now + self.waiting_seconds,
                resync_at=now + RESYNC_INITIAL_SECONDS + phase * self.resync_interval(),
            )
        return entry

    def due(self, now: float, busy: Container[Key] = (), *, timed: bool = True) -> list[Due]:
        """The passes due at `now`, one per object at most, each reason rescheduled. A reason
        that does not apply now (progress of a gang that is not running) is skipped, not
        queued. A `busy` object (its pass is running) keeps what is due for when it is not.
        `timed=False` looks only at the objects an event asked for (no scan of every object's
        due times), as when an event, not the tick, woke the loop."""
        keys = list(self._entries) if timed else list(self._soon)
        resync = self.resync_interval()
        passes = []
        for key in keys:
            if key in busy:
                continue
            entry = self._entries[key]
            soon, serve = key in self._soon, key in self._serve_soon
            self._soon.discard(key)
            self._serve_soon.discard(key)
            # A finished object's Job or pods moved (its Job's start-up listing, say): nothing a
            # pass could change, where a long history would queue one pass per finished job.
            # Its serving Deployment's events still count, as do its follow-up and resync.
            soon = soon and _asked_by_events(entry, serve)
            scrape = children = follow_up = False
            if entry.follow_up_at is not None and entry.follow_up_at <= now:
                entry.follow_up_at, follow_up = None, True
            if entry.progress_at <= now:
                entry.progress_at = _next(entry.progress_at, self.progress_seconds, now)
                scrape = entry.running
            if entry.waiting_at <= now:
                entry.waiting_at = _next(entry.waiting_at, self.waiting_seconds, now)
                children = entry.waiting
            if entry.resync_at <= now:
                entry.resync_at = _next(entry.resync_at, resync, now)
                children = True
            if soon or follow_up or scrape or children:
                serve = serve or children
                due = Due(key, scrape=scrape, children=children, serve=serve, periodic=not soon)
                passes.append(due)
        return passes


def _next(at: float, interval: float, now: float) -> float:
    """The next due time on the object's own grid after `now`: a loop that fell behind (a busy
    event loop) skips the missed beats instead of firing them in a burst."""
    beats = int((now - at) // interval) + 1
    return at + beats * interval


def describe(exc: BaseException) -> str:
    """repr(exc), with the HTTP status and reason of an API error: the kubernetes client's
    ApiException has no args, so its repr alone is `ApiException()`."""
    status = getattr(exc, "status", None)
    if status is None:
        return repr(exc)
    return f"{type(exc).__name__}({status} {getattr(exc, 'reason', '')})"


async def run(clock: Clock, fire: Callable[[Due], Awaitable[Any]], wake: asyncio.Event) -> None:
    """Fire every due pass, forever: every object's due times each tick, and the objects an
    event asked for at once when `wake` is set. An object whose pass is in flight keeps its
    reasons until that pass ends."""
    loop = asyncio.get_running_loop()
    in_flight: dict[Key, asyncio.Task[Any]] = {}

    def done(key: Key, task: asyncio.Task[Any]) -> None:
        in_flight.pop(key, None)
        if clock.asked(key):  # an event came while it ran: its pass is due now
            wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Nothing retries it but the next reason for this object (its resync at the latest).
            log.warning("pass of %s/%s failed: %s", *key, describe(exc), exc_info=exc)

    next_tick = loop.time()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(next_tick - loop.time(), 0.0))
            wake.clear()
            now = loop.time()
            timed = now >= next_tick
            if timed:
                next_tick = now + TICK_SECONDS
            for due in clock.due(now, busy=in_flight, timed=timed):
                task = loop.create_task(fire(due))
                in_flight[due.key] = task
                task.add_done_callback(lambda t, key=due.key: done(key, t))
    finally:
        for task in in_flight.values():
            task.cancel()
