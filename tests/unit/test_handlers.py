"""The kopf handlers' wiring: which passes they run, and what they tell the clock."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from finetune_operator import clock, handlers


@pytest.mark.parametrize(
    ("event", "status", "running", "waiting"),
    [
        ({"type": None}, {}, False, False),
        ({"type": "MODIFIED"}, {"phase": "Running"}, True, False),
        ({"type": "MODIFIED"}, {"phase": "Pending", "conditions": [
            {"type": "Created", "status": "False", "reason": "SecretNotFound"}]}, False, True),
        ({"type": "MODIFIED"}, {"phase": "Failed", "conditions": [
            {"type": "Created", "status": "False"}]}, False, False),
    ],
)  # fmt: skip
def test_every_event_tells_the_clock_what_the_object_needs(
    event: dict[str, Any], status: dict[str, Any], running: bool, waiting: bool
) -> None:
    async def scenario() -> list[clock.Due]:
        await handlers.track(event=event, status=status, namespace="ns", name="job")
        now = asyncio.get_running_loop().time()
        return handlers._clock.due(now + 3600)

    try:
        (due,) = asyncio.run(scenario())
        assert due.key == ("ns", "job") and due.scrape is running and due.children
        entry = handlers._clock._entries[("ns", "job")]
        assert (entry.running, entry.waiting) == (running, waiting)
    finally:
        handlers._clock.forget(("ns", "job"))


def test_a_deleted_object_leaves_the_clock() -> None:
    async def scenario() -> None:
        await handlers.track(event={"type": None}, status={}, namespace="ns", name="gone")
        assert len(handlers._clock) == 1
        await handlers.track(event={"type": "DELETED"}, status={}, namespace="ns", name="gone")

    asyncio.run(scenario())
    assert len(handlers._clock) == 0


@pytest.mark.parametrize(
    "due",
    [
        clock.Due(("ns", "job"), scrape=True, children=False),
        clock.Due(("ns", "job"), scrape=False, children=True),
    ],
)
def test_the_clocks_passes_are_periodic_passes(
    due: clock.Due, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    async def fake(namespace: str, name: str, **kwargs: Any) -> None:
        calls.append({"namespace": namespace, "name": name, **kwargs})

    monkeypatch.setattr(handlers, "_reconcile", fake)
    asyncio.run(handlers.periodic(due))
    assert calls == [
        {"namespace": "ns", "name": "job", "periodic": True, "scrape": due.scrape,
         "children": due.children}
    ]  # fmt: skip


def test_no_kopf_timers_keep_a_task_and_a_body_per_object() -> None:
    spawning = kopf.get_default_registry()._spawning.get_all_handlers()
    assert [h.id for h in spawning] == []


def test_create_and_resume_read_the_gangs_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an operator restart, a training gang's status is brought up to date by the resume
    pass itself, not seconds later by the first progress tick."""
    calls: list[dict[str, Any]] = []

    async def fake(namespace: str, name: str, **kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(handlers, "_reconcile", fake)
    asyncio.run(handlers.reconcile_ftj(namespace="ns", name="job"))
    assert calls == [{"scrape": True}]
