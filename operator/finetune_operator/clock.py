"""The operator's clock: every pass that no watch event triggers, for all FineTuneJobs, from one
loop.

Four reasons to look at a FineTuneJob unprompted:
- **follow-up**: a pass asked for another one later (`Plan.requeue_after`, as controller-runtime's
  `RequeueAfter`): a pod that fails to pull its image or to fit on a node changes nothing the
  operator watches, and `runPolicy.pendingTimeoutSeconds` runs out at a moment only the clock
  knows. One per object, replaced by every later pass: the latest pass saw the latest state.
- **waiting**: the Job is held back by something the operator cannot watch (a Secret), so it
  looks again every `waiting_seconds`.
- **progress**: a Running gang's rank 0 is scraped every `progress_seconds`.
- **resync**: every object is passed over every `resync_seconds`, because lost watch events
  (kopf#1276, #955) would otherwise leave its status stale for good.

kopf timers did the last three before. kopf keeps a task and a live copy of the body per object
and timer, so 2,000 objects cost 6,000 tasks and their bodies; and objects created in one burst
had their timers fire in one wave. Here an object costs a key, two flags and four due times,
learned from the watch events that every object sends anyway, and each object's periodic passes
are spread over their interval by a stable hash of its key.

`Clock` is pure (the caller passes the time); `run` is the loop around it.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
Key = tuple[str, str]
# How often the loop looks for due passes. Finer buys nothing: a pass takes longer than this,
# and the shortest interval (progress) is ten times it.
TICK_SECONDS = 1.0
# The first resync of an object comes no sooner than this after it is first seen: the create or
# resume pass has just looked at it.
RESYNC_INITIAL_SECONDS = 30.0


@dataclass(frozen=True)
class Due:
    """One pass the clock asks for; several reasons due at once for one object merge into one."""

    key: Key
    # Read rank 0's metrics (progress).
    scrape: bool
    # Read and converge the children too (waiting, resync); a follow-up or a progress read only
    # needs the Job and its pods.
    children: bool


@dataclass
class _Entry:
    running: bool
    waiting: bool
    progress_at: float
    waiting_at: float
    resync_at: float
    follow_up_at: float | None = None


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

    def __len__(self) -> int:
        return len(self._entries)

    def track(self, key: Key, *, running: bool, waiting: bool, now: float) -> None:
        """Record what the latest watch event says of an object; a new one gets its schedule."""
        entry = self._entries.get(key)
        if entry is None:
            phase = _phase(key)
            self._entries[key] = _Entry(
                running=running,
                waiting=waiting,
                progress_at=now + phase * self.progress_seconds,
                waiting_at=now + self.waiting_seconds,
                resync_at=now + RESYNC_INITIAL_SECONDS + phase * self.resync_seconds,
            )
            return
        if waiting and not entry.waiting:
            # Newly held back: the pass that found it has just looked.
            entry.waiting_at = now + self.waiting_seconds
        entry.running, entry.waiting = running, waiting

    def forget(self, key: Key) -> None:
        self._entries.pop(key, None)

    def follow_up(self, key: Key, after: float | None, now: float) -> None:
        """Ask for one pass `after` seconds from `now`, replacing the object's earlier follow-up;
        None cancels it. An object not tracked yet (its ADDED event has not arrived) is tracked
        from here, as neither running nor waiting, until its events say more."""
        if key not in self._entries:
            self.track(key, running=False, waiting=False, now=now)
        self._entries[key].follow_up_at = None if after is None else now + max(after, 0.0)

    def pending_follow_up(self, key: Key) -> float | None:
        entry = self._entries.get(key)
        return entry.follow_up_at if entry is not None else None

    def due(self, now: float) -> list[Due]:
        """The passes due at `now`, one per object at most, each reason rescheduled. A reason
        that does not apply now (progress of a gang that is not running) is skipped, not
        queued."""
        passes = []
        for key, entry in self._entries.items():
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
                entry.resync_at = _next(entry.resync_at, self.resync_seconds, now)
                children = True
            if follow_up or scrape or children:
                passes.append(Due(key, scrape=scrape, children=children))
        return passes


def _next(at: float, interval: float, now: float) -> float:
    """The next due time on the object's own grid after `now`: a loop that fell behind (a busy
    event loop) skips the missed beats instead of firing them in a burst."""
    beats = int((now - at) // interval) + 1
    return at + beats * interval


async def run(clock: Clock, fire: Callable[[Due], Awaitable[Any]]) -> None:
    """Fire every due pass, forever. An object whose previous pass from the clock is still in
    flight is skipped this tick: its reasons come round again, and a follow-up is asked for anew
    by that pass itself."""
    loop = asyncio.get_running_loop()
    in_flight: dict[Key, asyncio.Task[Any]] = {}

    def done(key: Key, task: asyncio.Task[Any]) -> None:
        in_flight.pop(key, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Nothing retries it but the clock's next reason for this object.
            log.warning("periodic pass of %s/%s failed: %r", *key, exc)

    try:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            for due in clock.due(loop.time()):
                if due.key in in_flight:
                    continue
                task = loop.create_task(fire(due))
                in_flight[due.key] = task
                task.add_done_callback(lambda t, key=due.key: done(key, t))
    finally:
        for task in in_flight.values():
            task.cancel()
