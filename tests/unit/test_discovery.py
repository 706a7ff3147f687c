"""The look-again wrapper around kopf's processor of CRD events (finetune_operator.discovery).

`Discovery` below stands in for kopf's own processor, which needs an API server: each call is
one look at discovery, and the resource is "published" on the look the test chooses, the way
the API server publishes a CRD a moment after it is Established. The real processor, with a
real API server, is exercised by tests/controlplane/test_suspend.py (a Kueue installed after the
operator is watched at once).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from kopf._cogs.structs import references
from kopf._core.reactor import observation

from finetune_operator import discovery

WORKLOADS = ("kueue.x-k8s.io", "workloads")


def crd_event(
    type_: str | None = "MODIFIED",
    plural: str = "workloads",
    established: bool = True,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{plural}.kueue.x-k8s.io"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    condition = {"type": "Established", "status": "True" if established else "False"}
    crd = {
        "metadata": meta,
        "spec": {"group": "kueue.x-k8s.io", "names": {"plural": plural}},
        "status": {"conditions": [condition]},
    }
    return {"type": type_, "object": crd}


class Discovery:
    """Stands in for kopf's processor: counts the looks, and serves the Workload resource from
    look number `served_on` on (never if 0)."""

    def __init__(self, served_on: int) -> None:
        self.served_on, self.looks = served_on, 0

    async def __call__(self, *, raw_event: Any, insights: references.Insights, **_: Any) -> None:
        self.looks += 1
        if self.served_on and self.looks >= self.served_on:
            resource = references.Resource("kueue.x-k8s.io", "v1beta2", "workloads")
            insights.watched_resources.add(resource)


def looks(served_on: int, event: dict[str, Any]) -> int:
    processor = Discovery(served_on)
    wrapped = discovery.look_again_until_served(processor, {WORKLOADS})
    asyncio.run(wrapped(raw_event=event, insights=references.Insights(), settings=None))
    return processor.looks


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "DELAYS", (0.0,) * len(discovery.DELAYS))


def test_an_established_crd_missing_from_discovery_is_looked_at_again_until_served() -> None:
    assert looks(served_on=3, event=crd_event()) == 3
    assert looks(served_on=1, event=crd_event()) == 1


def test_it_gives_up_with_a_warning_after_the_last_delay(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=discovery.__name__):
        assert looks(served_on=0, event=crd_event()) == 1 + len(discovery.DELAYS)
    assert "workloads.kueue.x-k8s.io is Established, but discovery still" in caplog.text


@pytest.mark.parametrize(
    "event",
    [
        crd_event(type_=None),  # kopf's initial listing: it has just scanned everything
        crd_event(type_="ADDED", established=False),  # its Established event follows
        crd_event(type_="DELETED"),
        crd_event(deleting=True),
        crd_event(plural="clusterqueues"),  # a CRD no handler of the operator watches
    ],
    ids=["initial-listing", "not-established", "deleted", "deleting", "other-crd"],
)
def test_other_events_get_kopfs_one_look(event: dict[str, Any]) -> None:
    assert looks(served_on=0, event=event) == 1


def test_install_wraps_the_processor_kopf_starts_its_crd_watch_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = observation.process_discovered_resource_event
    monkeypatch.setattr(observation, "process_discovered_resource_event", original)
    discovery.install({WORKLOADS})
    wrapped = observation.process_discovered_resource_event
    assert wrapped is not original
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
