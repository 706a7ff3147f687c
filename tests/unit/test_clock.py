"""The operator's clock: which passes fall due when, for how many objects, and the loop."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
from kubernetes.client.exceptions import ApiException

from finetune_operator import clock
from finetune_operator.clock import Clock, Due

KEY = ("ns", "job")


def _clock() -> Clock:
    return Clock(resync_seconds=60, progress_seconds=10, waiting_seconds=10)


def _fired(c: Clock, start: float, end: float, step: float = 1.0) -> list[tuple[float, Due]]:
    """Every pass due while the time goes from start to end, ticking like the loop."""
    out, now = [], start
    while now <= end:
        out += [(now, d) for d in c.due(now)]
        now += step
    return out


def test_a_running_gang_is_scraped_every_progress_interval_and_resynced_every_resync() -> None:
    c = _clock()
    c.track(KEY, running=True, waiting=False, now=0)
    fired = _fired(c, 0, 300)
    scrapes = [t for t, d in fired if d.scrape]
    resyncs = [t for t, d in fired if d.children]
    assert len(scrapes) == 30  # one per 10 s over 300 s
    assert all(b - a == 10 for a, b in itertools.pairwise(scrapes))
    assert resyncs[0] >= clock.RESYNC_INITIAL_SECONDS  # the create pass has just looked
    gaps = [b - a for a, b in itertools.pairwise(resyncs)]
    assert len(gaps) >= 3 and set(gaps) == {60}


def test_a_gang_that_is_not_running_costs_no_scrape_and_a_finished_one_only_its_resync() -> None:
    c = _clock()
    c.track(KEY, running=False, waiting=False, now=0)
    fired = _fired(c, 0, 200)
    assert fired and all(d.children and not d.scrape for _, d in fired)
    assert len(fired) == 3  # resyncs only
    c.track(KEY, running=True, waiting=False, now=200)  # its gang started
    assert any(d.scrape for _, d in _fired(c, 201, 211))


def test_a_waiting_job_is_looked_at_every_waiting_interval_until_it_stops_waiting() -> None:
    c = _clock()
    c.track(KEY, running=False, waiting=True, now=0)
    waits = [t for t, d in _fired(c, 0, 25) if d.children]
    assert waits == [10, 20]
    c.track(KEY, running=False, waiting=False, now=25)  # the Secret appeared
    assert [t for t, d in _fired(c, 26, 29 + clock.RESYNC_INITIAL_SECONDS) if d.children] == []


def test_a_follow_up_fires_once_and_a_later_pass_replaces_or_cancels_it() -> None:
    c = _clock()
    c.follow_up(KEY, 5, now=0)  # tracked from here: its ADDED event may come later
    c.follow_up(KEY, 2, now=1)  # a later pass's answer replaces the first
    fired = _fired(c, 0, 20)
    assert [(t, d) for t, d in fired] == [(3, Due(KEY, scrape=False, children=False))]
    c.follow_up(KEY, 2, now=20)
    c.follow_up(KEY, None, now=21)  # running now: nothing more to look at
    assert _fired(c, 21, 25) == []


def test_reasons_due_together_make_one_pass() -> None:
    c = _clock()
    c.track(KEY, running=True, waiting=True, now=0)
    c.follow_up(KEY, 0, now=0)
    # Follow-up, progress, waiting and resync all due at once: one pass does them all.
    assert c.due(1000) == [Due(KEY, scrape=True, children=True, serve=True)]
    ticks = [t for t, _ in _fired(c, 1001, 1300)]
    assert len(ticks) == len(set(ticks))


def test_a_deleted_object_is_forgotten() -> None:
    c = _clock()
    c.track(KEY, running=True, waiting=False, now=0)
    c.forget(KEY)
    assert len(c) == 0 and _fired(c, 0, 100) == []


def test_a_burst_is_spread_over_the_interval_not_fired_in_one_wave() -> None:
    """2,000 objects seen in the same second: their resyncs fall over the whole interval."""
    c = _clock()
    keys = [("ns", f"job-{i}") for i in range(2000)]
    for key in keys:
        c.track(key, running=False, waiting=False, now=0)
    assert c.resync_interval() == 2000 / clock.RESYNC_PASSES_PER_SECOND
    fired = _fired(c, 0, clock.RESYNC_INITIAL_SECONDS + c.resync_interval())
    assert {d.key for _, d in fired} == set(keys)  # every object once in its first interval
    per_second: dict[float, int] = {}
    for t, _ in fired:
        per_second[t] = per_second.get(t, 0) + 1
    # One wave would be 2,000 in one tick.
    assert max(per_second.values()) < 80


def test_many_objects_stretch_the_resync_to_a_bounded_rate() -> None:
    """A few objects are resynced every resync_seconds; 2,000 at most RESYNC_PASSES_PER_SECOND
    a second, each still within its (stretched) interval."""
    few = _clock()
    few.track(KEY, running=False, waiting=False, now=0)
    assert few.resync_interval() == 60
    c = _clock()
    keys = [("ns", f"job-{i}") for i in range(2000)]
    for key in keys:
        c.track(key, running=False, waiting=False, now=0)
    fired = _fired(c, 0, 1000)
    steady = [d for t, d in fired if t >= 400]
    assert len(steady) <= clock.RESYNC_PASSES_PER_SECOND * 601
    late = {d.key for t, d in fired if t >= 1000 - c.resync_interval()}
    assert late == set(keys)  # none left out of the last interval


def test_a_loop_that_fell_behind_skips_missed_beats() -> None:
    c = _clock()
    c.track(KEY, running=True, waiting=False, now=0)
    assert len([d for d in c.due(1000) if d.scrape]) == 1  # not the 100 it missed
    assert [d for d in c.due(1001) if d.scrape] == []


def test_events_queue_one_pass_and_a_busy_object_keeps_it_until_its_pass_ends() -> None:
    c = _clock()
    c.soon(KEY, now=0)
    c.soon(KEY, now=0.1)  # a second event before the pass: still one pass
    assert c.due(0.2, busy={KEY}, timed=False) == []  # running: kept, not lost
    assert c.asked(KEY)
    assert c.due(0.3, timed=False) == [Due(KEY, periodic=False)]
    assert not c.asked(KEY) and c.due(0.4, timed=False) == []


def test_only_the_serving_deployments_event_or_a_pass_over_the_children_reads_the_rollout() -> None:
    c = _clock()
    c.soon(KEY, now=0)  # e.g. its Job moved: the serving Deployment cannot have
    assert c.due(0.1, timed=False) == [Due(KEY, periodic=False)]
    c.soon(KEY, now=1, serve=True)
    c.soon(KEY, now=1.1)  # a Job event merged into the same pass keeps the Deployment's ask
    assert c.due(1.2, busy={KEY}, timed=False) == []  # kept while the previous pass runs
    assert c.due(1.3, timed=False) == [Due(KEY, serve=True, periodic=False)]
    assert c.due(1.4, timed=False) == []
    resyncs = [d for _, d in _fired(c, 2, 2 + clock.RESYNC_INITIAL_SECONDS + 60) if d.children]
    assert resyncs and all(d.serve for d in resyncs)


def test_a_finished_objects_events_ask_nothing_but_its_serving_deployments() -> None:
    """After a restart over a long history, the Jobs' listing would otherwise queue a pass per
    finished job ahead of the live jobs' passes."""
    c = _clock()
    c.track(KEY, running=False, waiting=False, finished=True, now=0)
    c.soon(KEY, now=0)  # its Job in the start-up listing, say
    assert c.due(0.1, timed=False) == [] and not c.asked(KEY)
    c.soon(KEY, now=1, serve=True)
    assert c.due(1.1, timed=False) == [Due(KEY, serve=True, periodic=False)]
    c.follow_up(KEY, 5, now=2)  # its TTL
    assert [d for _, d in _fired(c, 2, 10)] == [Due(KEY)]
    resyncs = [d for _, d in _fired(c, 11, 11 + clock.RESYNC_INITIAL_SECONDS + 60)]
    assert resyncs and all(d.children for d in resyncs)
    c.track(KEY, running=False, waiting=False, now=200)  # not finished (never, in practice)
    c.soon(KEY, now=200)
    assert [d.periodic for d in c.due(200.1, timed=False)] == [False]


def test_an_events_pass_for_an_object_found_finished_while_it_waited_is_idle() -> None:
    c = _clock()
    c.soon(KEY, now=0)  # its Job listed at start-up before its FineTuneJob
    (due,) = c.due(0.1, timed=False)
    assert not c.idle(due)
    c.track(KEY, running=False, waiting=False, finished=True, now=0.2)
    assert c.idle(due)
    # What else was due with it still runs: its serving Deployment's event, a resync.
    assert not c.idle(Due(KEY, serve=True, periodic=False))
    assert not c.idle(Due(KEY, children=True, serve=True))


def test_an_event_looks_only_at_its_own_object() -> None:
    c = _clock()
    c.track(("ns", "other"), running=True, waiting=False, now=0)
    c.soon(KEY, now=0)
    # The other object's progress is due, but only the tick (timed) looks at it.
    assert c.due(20, timed=False) == [Due(KEY, periodic=False)]
    assert c.due(20) == [Due(("ns", "other"), scrape=True)]


async def turns(n: int = 50) -> None:
    """Let the event loop run `n` iterations. Counted in iterations, not seconds: a sleep of
    50 ms let the test look early on a loaded machine, whose stalled process found the sleep's
    timer due before the loop had run the pass's callbacks (a CI run saw 1 pass, not 2)."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("fail", [False, True])
def test_the_loop_runs_an_events_pass_at_once_and_one_per_object_at_a_time(
    fail: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clock, "TICK_SECONDS", 3600)  # only events wake the loop
    started: list[Due] = []
    release = asyncio.Event()

    async def fire(due: Due) -> None:
        started.append(due)
        await release.wait()
        if fail:
            raise RuntimeError("API server away")

    async def scenario() -> None:
        c, wake = _clock(), asyncio.Event()
        loop = asyncio.get_running_loop()
        runner = loop.create_task(clock.run(c, fire, wake))
        await turns()
        c.soon(KEY, loop.time())
        wake.set()
        await turns()
        assert started == [Due(KEY, periodic=False)]  # at once, not at the next tick
        c.soon(KEY, loop.time())  # an event while its pass runs
        wake.set()
        await turns()
        assert len(started) == 1  # not a second pass beside the first
        release.set()
        await turns()
        assert len(started) == 2  # the event's pass, once the first ended
        runner.cancel()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert ("API server away" in caplog.text) is fail


def test_a_failed_pass_is_logged_with_the_api_errors_status() -> None:
    """The kubernetes client's ApiException has no args: its repr alone said `ApiException()`."""
    assert repr(ApiException(status=429, reason="Too Many Requests")) == "ApiException()"
    described = clock.describe(ApiException(status=429, reason="Too Many Requests"))
    assert described == "ApiException(429 Too Many Requests)"
    assert clock.describe(RuntimeError("API server away")) == "RuntimeError('API server away')"
