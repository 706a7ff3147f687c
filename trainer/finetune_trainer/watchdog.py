"""A rank that stops making progress: detect it within a bound, report it, and leave.

When a peer hangs in a collective or is stopped (SIGSTOP, a frozen node), every other rank
waits inside C++ until torch's collective timeout (30 minutes by default), and nothing in Python
can interrupt that wait. `HangWatchdog` is a thread that, while the training loop runs, expects
a completed step at least every `hang_timeout(recent step times, floor)` seconds. When none
comes it writes this rank's result (reason CollectiveTimeout, retryable) and ends the process
with `os._exit`: the pod fails, and the operator restarts the gang from its checkpoint.

Evaluation's batches, each of which ends in a gather across ranks, and the forwards of the
tokens it generates (in lockstep across ranks, generation.py) are timed the same way by a
watchdog of their own (`timed`), so a peer lost during the evaluation before or after training
is caught as one lost during a step. Loading, the scores' broadcast and the push are not
timed. A checkpoint save's
gathers are collectives and timed as a step's are; its write pauses the watchdog (rank 0 may
upload for minutes while the others wait): rank 0 times again as soon as its own write is done,
the others once every rank is past the save (a barrier), so a rank stopped before, during or
after a save is still caught; only a hang of rank 0 inside its own write is left to torch's
timeout.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

from finetune_api.constants import Reason
from finetune_api.pod import ExitCode
from finetune_trainer.result import write_failure

log = logging.getLogger(__name__)
T = TypeVar("T")

# A step this many times slower than the p99 of recent ones is a hang, not a slow step.
SLOWDOWN = 3.0
# Recent step durations the p99 is taken over.
WINDOW = 200


def p99(durations: Sequence[float]) -> float:
    """The nearest-rank 99th percentile; 0 for no durations."""
    if not durations:
        return 0.0
    ordered = sorted(durations)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def hang_timeout(durations: Sequence[float], floor: float) -> float:
    """Seconds without a completed step after which the gang is deemed hung: the larger of
    SLOWDOWN x p99 of the recent step durations and `floor` (runPolicy.hangTimeoutSeconds)."""
    return max(SLOWDOWN * p99(durations), floor)


class HangWatchdog:
    """Times the training loop's steps on one rank; use as a context manager around the loop,
    calling `step_done` after each optimizer step's collective and `pause` before a save (or
    iterate evaluation's batches through `timed`)."""

    def __init__(
        self,
        floor: float,
        rank: int,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 1.0,
        first_step_grace: float = 0.0,
        what: str = "training step",
        phases: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        """`first_step_grace` seconds are added to the first step's limit: a step that compiles
        (training.compile) is slow once, not hung. `what` is timed, for the message: "training
        step" or "evaluation step". `phases`: this process's phase stamps, for the result."""
        self.floor, self.rank, self.clock, self.what = float(floor), rank, clock, what
        self.phases = phases
        self.first_step_grace = float(first_step_grace)
        self.poll_seconds = min(poll_seconds, self.floor / 10)
        self.durations: deque[float] = deque(maxlen=WINDOW)
        self.step: int | None = None
        self.paused = False
        self._last = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def __enter__(self) -> HangWatchdog:
        with self._lock:
            self._last = self.clock()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def step_done(self, step: int) -> None:
        """A step completed on this rank (after the collective that every rank joins). The time
        since the previous one is a step duration, unless a pause (a save) or the loop's start
        (the first step warms up) lies in between."""
        with self._lock:
            now = self.clock()
            if self.step is not None and not self.paused:
                self.durations.append(now - self._last)
            self.step, self._last, self.paused = step, now, False

    def timed(self, items: Iterable[T]) -> Generator[T, None, None]:
        """`items`, each one's use timed as a step: done when the next is asked for. Only the
        iteration is timed: pause the watchdog before (a task may never ask for the items), and
        timing stops once they run out or the consumer stops early."""
        self.resume()
        try:
            for n, item in enumerate(items, start=1):
                yield item
                self.step_done(n)
        finally:
            self.pause()

    def pause(self) -> None:
        """Stop timing until `resume` (or the next `step_done`): a checkpoint save is about to
        start."""
        with self._lock:
            self.paused = True

    def resume(self) -> None:
        """Time again from now: the save is over (on this rank, or on every rank). The pause is
        not a step duration, and the step after it is timed from here."""
        with self._lock:
            self._last, self.paused = self.clock(), False

    def check(self, now: float) -> str | None:
        """Why the gang is deemed hung at `now`, or None while it is not."""
        with self._lock:
            if self.paused:
                return None
            first = self.step is None
            grace = self.first_step_grace if first else 0.0
            limit = hang_timeout(self.durations, self.floor) + grace
            waited = now - self._last
            if waited < limit:
                return None
            unit = self.what.rsplit(" ", 1)[-1]
            after = f"for the first {unit}" if first else f"after {unit} {self.step}"
            compiling = f" + {grace:g}s to compile the layers" if grace else ""
            return (
                f"no {self.what} completed in {waited:.0f}s {after} (limit {limit:.0f}s: the "
                f"larger of runPolicy.hangTimeoutSeconds={self.floor:g}s and {SLOWDOWN:g} x p99 "
                f"{unit} time {p99(self.durations):.3g}s{compiling}); a rank is hung in a "
                "collective or stopped, so the gang restarts from its last checkpoint"
            )

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            message = self.check(self.clock())
            if message is not None:
                self._leave(message)

    def _leave(self, message: str) -> None:
        """Report and end the process: the main thread may be stuck in a C++ collective, which
        neither an exception nor a signal handler (both run on the main thread) can interrupt."""
        try:
            log.error("rank %d: %s", self.rank, message)
            write_failure(self.rank, Reason.COLLECTIVE_TIMEOUT, message, self.phases())
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(ExitCode.RETRYABLE)
