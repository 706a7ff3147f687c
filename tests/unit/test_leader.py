"""leader.py's decisions, pure: when a candidate may write the Lease, and what it writes.
tests/controlplane/test_leader_election.py runs two operators against a real API server."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from finetune_operator.apply import Kube
from finetune_operator.leader import (
    LeaseHolder,
    Outcome,
    Seen,
    Timing,
    claim,
    lease_client,
    observe,
    released,
)

NS, NAME = "finetune-system", "finetune-operator"
WALL = datetime(2026, 12, 6, 1, 2, 3, 456789, tzinfo=UTC)
TIMING = Timing()


def lease(holder: str, renew: str = "2026-12-06T01:00:00.000000Z", transitions: int = 0) -> Any:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "42"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-06T00:59:00.000000Z",
            "renewTime": renew,
            "leaseTransitions": transitions,
        },
    }


def test_no_lease_is_created_held_by_the_candidate() -> None:
    seen = observe(None, None, now=100.0)
    written = claim(None, NS, NAME, "b", seen, 100.0, WALL, TIMING)
    assert written is not None
    assert written["metadata"] == {"name": NAME, "namespace": NS}  # a create: no resourceVersion
    assert written["spec"] == {
        "holderIdentity": "b",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-12-06T01:02:03.456789Z",
        "renewTime": "2026-12-06T01:02:03.456789Z",
        "leaseTransitions": 0,
    }


def test_another_holders_lease_counts_from_when_this_candidate_saw_it_change() -> None:
    held = lease("a")
    seen = observe(held, None, now=100.0)
    # The holder's renewTime is far in the past by this machine's clock: clocks are not compared.
    assert claim(held, NS, NAME, "b", seen, 114.9, WALL, TIMING) is None
    # Renewed meanwhile: the wait starts again from that sighting.
    renewed = lease("a", renew="2026-12-06T01:00:02.000000Z")
    seen = observe(renewed, seen, now=110.0)
    assert seen == Seen(seen.record, 110.0)
    assert claim(renewed, NS, NAME, "b", seen, 124.9, WALL, TIMING) is None
    # Not renewed for its 15 s: taken over, one more transition, carrying the version read.
    taken = claim(renewed, NS, NAME, "b", observe(renewed, seen, 125.0), 125.0, WALL, TIMING)
    assert taken is not None
    assert taken["metadata"]["resourceVersion"] == "42"
    assert taken["spec"]["holderIdentity"] == "b"
    assert taken["spec"]["leaseTransitions"] == 1
    assert taken["spec"]["acquireTime"] == "2026-12-06T01:02:03.456789Z"


def test_the_holder_renews_keeping_its_acquire_time() -> None:
    held = lease("a", transitions=3)
    renewed = claim(held, NS, NAME, "a", observe(held, None, 100.0), 100.0, WALL, TIMING)
    assert renewed is not None
    assert renewed["spec"]["acquireTime"] == "2026-12-06T00:59:00.000000Z"
    assert renewed["spec"]["renewTime"] == "2026-12-06T01:02:03.456789Z"
    assert renewed["spec"]["leaseTransitions"] == 3


def test_a_released_lease_is_taken_at_once() -> None:
    free = released(lease("a", transitions=2), "a", WALL)
    assert free is not None
    assert free["spec"]["holderIdentity"] == ""
    assert free["spec"]["leaseDurationSeconds"] == 1
    assert free["metadata"]["resourceVersion"] == "42"
    taken = claim(free, NS, NAME, "b", observe(free, None, 100.0), 100.0, WALL, TIMING)
    assert taken is not None and taken["spec"]["holderIdentity"] == "b"
    assert taken["spec"]["leaseTransitions"] == 3


def test_only_the_holder_releases() -> None:
    assert released(lease("a"), "b", WALL) is None


def test_timing_keeps_client_gos_proportions() -> None:
    assert Timing() == Timing.for_lease(15) == Timing(15, 10, 2)
    assert Timing.for_lease(3) == Timing(3, 2, 0.4)


def test_a_holder_whose_renewals_hang_stops_acting_by_its_deadline() -> None:
    """The API server stops answering: a real listener that takes connections and never
    replies, so each renewal hangs in its read (the client's timeout is 60 s, retried). The
    holder still stops acting once it has not renewed for renew_deadline_seconds, before its
    lease can expire for the other candidates."""
    timing = Timing.for_lease(1.5)  # renew within 1 s, retry every 0.2 s
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.getsockname()[1]}"
        lost = threading.Event()
        holder = LeaseHolder(
            Kube(configuration, max_requests=1), NS, NAME, "a", timing, on_lost=lost.set
        )
        holder.hold()
        # Far sooner than one hung request returns (60 s): seconds of slack for a loaded machine.
        assert lost.wait(20)
        assert holder.lost.is_set()
    holder.release()  # the listener is gone: the hung request ends, and nothing is written


def test_a_candidate_whose_request_hangs_tries_again_after_the_renew_deadline() -> None:
    """The lease's client gives a request up after the renew deadline, unretried: a standby
    whose connection went dead tries again (and takes over) within seconds, not after the
    operator's 60 s read timeout retried three times. The API server: a real listener that
    takes connections and never replies."""
    timing = Timing.for_lease(1.5)  # renew deadline 1 s
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.getsockname()[1]}"
        holder = LeaseHolder(lease_client(timing, configuration), NS, NAME, "b", timing)
        started = time.monotonic()
        assert holder._try() is Outcome.FAILED
        # One read timeout of 1 s, not 4 x 60 s; seconds of slack for a loaded machine.
        assert time.monotonic() - started < 20
    holder.release()
