"""The kopf handlers' wiring: which passes they run, and when their timers live."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from finetune_operator import handlers


def _timer(handler_id: str) -> Any:
    spawning = kopf.get_default_registry()._spawning.get_all_handlers()
    return next(h for h in spawning if h.id == handler_id)


@pytest.mark.parametrize(
    ("phase", "lives"),
    [(None, True), ("Pending", True), ("Running", True), ("Suspended", True),
     ("Succeeded", False), ("Failed", False)],
)  # fmt: skip
def test_the_progress_timer_lives_until_the_job_finishes(phase: str | None, lives: bool) -> None:
    """Its filter must not flip Running -> Restarting -> Running: kopf may then lose the timer
    for good (it skips the re-spawn while the stopped one is still ending)."""
    status = {"phase": phase} if phase else {}
    assert _timer("progress").when is handlers._unfinished
    assert handlers._unfinished(status) is lives


@pytest.mark.parametrize("phase", [None, "Pending", "Suspended", "Running"])
def test_the_progress_timer_reads_only_a_running_gang(
    phase: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    async def fake(namespace: str, name: str, **kwargs: Any) -> None:
        calls.append({"namespace": namespace, "name": name, **kwargs})

    monkeypatch.setattr(handlers, "_reconcile", fake)
    status = {"phase": phase} if phase else {}
    asyncio.run(handlers.progress(namespace="ns", name="job", status=status))
    if phase == "Running":
        assert calls == [
            {"namespace": "ns", "name": "job", "periodic": True, "scrape": True, "children": False}
        ]
    else:
        assert calls == []


def test_create_and_resume_read_the_gangs_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an operator restart, a training gang's status is brought up to date by the resume
    pass itself, not seconds later by the first progress tick."""
    calls: list[dict[str, Any]] = []

    async def fake(namespace: str, name: str, **kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(handlers, "_reconcile", fake)
    asyncio.run(handlers.reconcile_ftj(namespace="ns", name="job"))
    assert calls == [{"scrape": True}]
