"""Follow-up passes at the time a pass asked for, as controller-runtime's `RequeueAfter`.

A pass whose plan says `requeue_after` (pods that have not all started) gets one more pass that
many seconds later, without any watch event: a pod that fails to pull its image or to fit on a
node changes nothing the operator watches, and a stuck pod's runPolicy.pendingTimeoutSeconds
runs out at a moment only the clock knows. One follow-up per FineTuneJob at most, replaced by
every later pass, so it costs a timer handle, not a kopf timer per object (kopf keeps each
timer's object body, and a wave of timers over thousands of objects is what the resync already
costs). The schedule lives in memory: after a restart, kopf's resume handler passes over every
object again and schedules anew, and the resync timer covers anything lost in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)
Key = tuple[str, str]


class Requeue:
    def __init__(self) -> None:
        self._handles: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def schedule(self, key: Key, seconds: float | None, run: Callable[[], Awaitable[Any]]) -> None:
        """Run `run` after `seconds`, replacing the key's earlier follow-up; None cancels it.
        The latest pass saw the latest state, so its answer is the one that counts."""
        self.cancel(key)
        if seconds is None:
            return
        loop = asyncio.get_running_loop()
        self._handles[key] = loop.call_later(max(seconds, 0.0), self._fire, key, run)

    def cancel(self, key: Key) -> None:
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.cancel()

    def pending(self, key: Key) -> float | None:
        """The loop time the key's follow-up is due at, or None (for tests)."""
        handle = self._handles.get(key)
        return handle.when() if handle is not None else None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        for task in self._tasks:
            task.cancel()

    def _fire(self, key: Key, run: Callable[[], Awaitable[Any]]) -> None:
        self._handles.pop(key, None)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)  # a task nobody references may be collected mid-flight
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Nothing retries a follow-up; the resync timer passes over the object anyway.
            log.warning("follow-up pass failed: %r", exc)
