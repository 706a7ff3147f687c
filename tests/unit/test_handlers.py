"""The kopf handlers' wiring: which passes they run, and what they tell the clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from prometheus_client import CollectorRegistry

from finetune_operator import clock, handlers, naming
from finetune_operator.metrics import OperatorMetrics


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
        await handlers.track(event=event, status=status, annotations={}, namespace="ns", name="job")
        now = asyncio.get_running_loop().time()
        return handlers._clock.due(now + 3600)

    try:
        (due,) = asyncio.run(scenario())
        assert due.key == ("ns", "job") and due.scrape is running and due.children
        entry = handlers._clock._entries[("ns", "job")]
        assert (entry.running, entry.waiting) == (running, waiting)
        assert entry.finished is (status.get("phase") == "Failed")
    finally:
        handlers._clock.forget(("ns", "job"))


def test_a_deleted_object_leaves_the_clock() -> None:
    async def scenario() -> None:
        for type_ in (None, "DELETED"):
            event = {"type": type_}
            await handlers.track(
                event=event, status={}, annotations={}, namespace="ns", name="gone"
            )
            assert len(handlers._clock) == (1 if type_ is None else 0)

    asyncio.run(scenario())
    assert len(handlers._clock) == 0


@pytest.mark.parametrize(
    ("status", "annotations", "queued"),
    [
        # A copy of a handled FineTuneJob: kopf's record, and no pass has written a status.
        ({}, {"finetune.dev/last-handled-configuration": "{}"}, True),
        # Handled here: its status came before kopf wrote the record.
        ({"phase": "Pending"}, {"finetune.dev/last-handled-configuration": "{}"}, False),
        # New: kopf's create handler runs its pass.
        ({}, {}, False),
    ],
)
def test_a_copy_of_a_handled_object_is_queued_for_a_pass(
    status: dict[str, Any], annotations: dict[str, str], queued: bool
) -> None:
    async def scenario() -> list[clock.Due]:
        event = {"type": "ADDED"}
        await handlers.track(
            event=event, status=status, annotations=annotations, namespace="ns", name="copy"
        )
        return handlers._clock.due(asyncio.get_running_loop().time(), timed=False)

    try:
        assert [d.key for d in asyncio.run(scenario())] == ([("ns", "copy")] if queued else [])
    finally:
        handlers._clock.forget(("ns", "copy"))


@pytest.mark.parametrize(
    "due",
    [
        clock.Due(("ns", "job"), scrape=True, children=False, periodic=True),
        clock.Due(("ns", "job"), scrape=False, children=True, serve=True, periodic=True),
        clock.Due(("ns", "job"), scrape=False, children=False, periodic=False),
        clock.Due(("ns", "job"), scrape=False, children=False, serve=True, periodic=False),
    ],
)
def test_a_queued_pass_runs_as_its_reasons_say(
    due: clock.Due, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    async def fake(namespace: str, name: str, **kwargs: Any) -> None:
        calls.append({"namespace": namespace, "name": name, **kwargs})

    monkeypatch.setattr(handlers, "_reconcile", fake)
    asyncio.run(handlers.queued(due))
    assert calls[0].pop("idle")() is False  # nothing known of the object: it runs
    assert calls == [
        {"namespace": "ns", "name": "job", "periodic": due.periodic, "scrape": due.scrape,
         "children": due.children, "serve": due.serve}
    ]  # fmt: skip


def test_no_kopf_timers_keep_a_task_and_a_body_per_object() -> None:
    spawning = kopf.get_default_registry()._spawning.get_all_handlers()
    assert [h.id for h in spawning] == []


@pytest.mark.parametrize(
    ("status", "spec", "passes"),
    [
        ({}, {}, [{"scrape": True}]),  # created
        ({"phase": "Running"}, {}, [{"scrape": True}]),
        ({"phase": "Succeeded"}, {"serve": {"enabled": True}}, [{"scrape": True}]),
        ({"phase": "Succeeded"}, {}, []),
        ({"phase": "Failed"}, {}, []),
    ],
)
def test_create_and_resume_pass_over_what_is_not_finished(
    monkeypatch: pytest.MonkeyPatch,
    status: dict[str, Any],
    spec: dict[str, Any],
    passes: list[dict[str, Any]],
) -> None:
    """After an operator restart, a training gang's status is brought up to date by the resume
    pass itself, not seconds later by the first progress tick. A finished job (not serving) has
    no pass, which would queue ahead of the live ones': it is counted from its status."""
    calls: list[dict[str, Any]] = []

    async def fake(namespace: str, name: str, **kwargs: Any) -> None:
        calls.append(kwargs)

    metrics = OperatorMetrics(CollectorRegistry())
    monkeypatch.setattr(handlers, "_reconcile", fake)
    monkeypatch.setitem(handlers._state, "r", SimpleNamespace(metrics=metrics))
    asyncio.run(handlers.reconcile_ftj(status=status, spec=spec, namespace="ns", name="job"))
    assert calls == passes
    counted = metrics.live_jobs().get(("ns", "job"))
    assert (counted.phase if counted else None) == (None if passes else status["phase"])


@pytest.mark.parametrize("finished", [False, True])
def test_a_queued_pass_for_a_job_found_finished_meanwhile_does_not_run(
    monkeypatch: pytest.MonkeyPatch, finished: bool
) -> None:
    ran: list[tuple[str, str]] = []

    class Reconciler:
        async def reconcile(self, namespace: str, name: str, **_: Any) -> None:
            ran.append((namespace, name))  # None: as for an object that is gone

        def forget(self, namespace: str, name: str) -> None:
            pass

    monkeypatch.setitem(handlers._state, "r", Reconciler())
    key = ("ns", "done")
    try:
        handlers._clock.track(key, running=False, waiting=False, finished=finished, now=0)
        asyncio.run(handlers.queued(clock.Due(key, periodic=False)))
    finally:
        handlers._clock.forget(key)
    assert ran == ([] if finished else [key])


@pytest.mark.parametrize("handler", [handlers.job_changed, handlers.pod_changed])
@pytest.mark.parametrize("event_type", ["ADDED", "MODIFIED", "DELETED", None])
def test_a_child_event_queues_a_pass_of_its_owner_but_not_for_its_own_creation(
    handler: Any, event_type: str | None
) -> None:
    """Queued, not awaited: the handler returns at once, and events that come together make one
    pass (an event-driven one, ahead of the periodic ones)."""
    key = ("ns", "demo")

    async def scenario() -> list[clock.Due]:
        labels = {"finetune.dev/job-name": "demo"}
        await handler(event={"type": event_type}, labels=labels, namespace="ns")
        await handler(event={"type": event_type}, labels=labels, namespace="ns")
        return handlers._clock.due(asyncio.get_running_loop().time(), timed=False)

    try:
        queued = asyncio.run(scenario())
    finally:
        handlers._clock.forget(key)
    # ADDED: the pass that made the Job, or the Job's own event for a new pod, covers it.
    expected = [] if event_type == "ADDED" else [clock.Due(key, periodic=False)]
    assert queued == expected


def test_a_serving_deployments_event_queues_a_pass_that_reads_its_rollout() -> None:
    key = ("ns", "demo")

    async def scenario() -> list[clock.Due]:
        labels = {naming.LABEL_SERVED_JOB: "demo"}
        await handlers.serve_deployment_changed(
            event={"type": "MODIFIED"}, labels=labels, namespace="ns"
        )
        return handlers._clock.due(asyncio.get_running_loop().time(), timed=False)

    try:
        queued = asyncio.run(scenario())
    finally:
        handlers._clock.forget(key)
    assert queued == [clock.Due(key, serve=True, periodic=False)]


def test_only_pods_not_started_or_marked_not_ready_are_watched_for_a_pass() -> None:
    """A pod that starts or ends changes its Job, whose event brings the pass; one whose node
    stopped answering does not, but the node lifecycle controller marks it not ready."""
    pod = next(h for h in kopf.get_default_registry()._watching.get_all_handlers() if h.id == "pod")
    assert pod.when is handlers._unseen_by_its_job

    def status(phase: str | None, ready: str | None = None) -> dict:
        conditions = [{"type": "Ready", "status": ready}] if ready else []
        return {"phase": phase, "conditions": conditions}

    cases = [(None, None), ("Pending", None), ("Running", "True"), ("Running", "False"),
             ("Failed", "False"), ("Succeeded", None)]  # fmt: skip
    watched = [handlers._unseen_by_its_job(status(*case)) for case in cases]
    assert watched == [True, True, False, True, False, False]
