"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's `leaderelection` runs it.

kopf runs standalone, and several operator processes can run at once: the chart's
`replicaCount` standbys, the new pod of a rolling update, a deleted or evicted pod's replacement
while the old one still stops, and a pod on a node cut off from the control plane, which runs on
while its replacement starts elsewhere. Two operators would both act on every
FineTuneJob (two Events per transition, status writes racing each other). With the Lease, an
operator starts kopf only once it holds it: a second one waits until the first releases it (at
its exit) or has not renewed it for `lease_seconds`; one that fails to renew stops acting.

Expiry is judged as client-go judges it: by how long this candidate has seen the same record, on
its own monotonic clock, never by comparing its clock with the holder's renewTime (the clocks
of two nodes differ).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

from finetune_operator.apply import Kube

log = logging.getLogger(__name__)
Obj = dict[str, Any]
T = TypeVar("T")

# Where a pod's service account token tells it its own namespace (the Lease's, by default).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_LEASE = "finetune-operator"
# client-go's defaults (and controller-runtime's): 15 s lease, 10 s to renew it, 2 s retry.
DEFAULT_LEASE_SECONDS = 15


@dataclass(frozen=True)
class Timing:
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    # A holder that could not renew for this long stops acting, before its lease can expire for
    # the other candidates.
    renew_deadline_seconds: float = DEFAULT_LEASE_SECONDS * 2 / 3
    retry_seconds: float = DEFAULT_LEASE_SECONDS / 7.5

    @classmethod
    def for_lease(cls, seconds: float) -> Timing:
        """client-go's proportions (15 / 10 / 2) for a lease of `seconds`."""
        return cls(seconds, seconds * 2 / 3, seconds / 7.5)


@dataclass(frozen=True)
class Seen:
    """The Lease record as this candidate last saw it change, and when (time.monotonic)."""

    record: tuple[str, str, int, int]
    at: float


def _record(lease: Obj | None) -> tuple[str, str, int, int]:
    spec = (lease or {}).get("spec") or {}
    return (
        str(spec.get("holderIdentity") or ""),
        str(spec.get("renewTime") or ""),
        int(spec.get("leaseTransitions") or 0),
        int(spec.get("leaseDurationSeconds") or 0),
    )


def observe(lease: Obj | None, seen: Seen | None, now: float) -> Seen:
    """What this candidate has seen: the record's first sighting keeps its time."""
    record = _record(lease)
    return seen if seen is not None and seen.record == record else Seen(record, now)


def micro_time(at: datetime) -> str:
    """A MicroTime, as the Lease's acquireTime and renewTime are written."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claim(
    lease: Obj | None,
    namespace: str,
    name: str,
    me: str,
    seen: Seen,
    now: float,
    wall: datetime,
    timing: Timing,
) -> Obj | None:
    """The Lease to write for `me` to hold it (created, taken over, or renewed), or None while
    another holder's lease is current: renewed less than its leaseDurationSeconds ago, as far
    as `seen` tells. Replacing carries the resourceVersion read, so a concurrent writer's
    change makes the write fail (409) rather than be overwritten."""
    holder, _, transitions, duration = _record(lease)
    if holder and holder != me and now < seen.at + (duration or timing.lease_seconds):
        return None
    stamp = micro_time(wall)
    spec = (lease or {}).get("spec") or {}
    mine = holder == me
    metadata: Obj = {"name": name, "namespace": namespace}
    if lease is not None:
        metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": me,
            "leaseDurationSeconds": int(timing.lease_seconds),
            "acquireTime": spec.get("acquireTime") if mine else stamp,
            "renewTime": stamp,
            "leaseTransitions": transitions if mine or lease is None else transitions + 1,
        },
    }


def released(lease: Obj, me: str, wall: datetime) -> Obj | None:
    """The Lease `me` leaves behind at its exit (client-go's ReleaseOnCancel: no holder, a
    1 s duration), so that the next candidate need not wait out the lease; None when `me` does
    not hold it."""
    holder, _, transitions, _ = _record(lease)
    if holder != me:
        return None
    stamp = micro_time(wall)
    return {
        **lease,
        "spec": {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "acquireTime": stamp,
            "renewTime": stamp,
            "leaseTransitions": transitions,
        },
    }


class Outcome(Enum):
    HELD = "held"  # this candidate holds the lease now
    OTHER = "other"  # another holder's lease is current
    FAILED = "failed"  # the API server could not be asked, or another writer came first


class LeaseHolder:
    """This process's hold on the Lease: `acquire` blocks until it holds it, a thread then
    renews it every `retry_seconds`, and `release` gives it up. A renewal that has not
    succeeded for `renew_deadline_seconds`, or a lease found taken, sets `lost` and calls
    `on_lost` (the operator stops with SIGTERM, as on a pod's deletion)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing = Timing(),
        on_lost: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM),
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.timing = timing
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._seen: Seen | None = None
        self._lease: Obj | None = None
        self._thread: threading.Thread | None = None
        self._renewed = 0.0  # time.monotonic() of the last renewal
        self._losing = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        # The API layer is async (its own thread pool); this holder is not on kopf's loop, so
        # a busy loop never delays a renewal.
        return asyncio.run(coro)

    def _try(self) -> Outcome:
        try:
            lease = self._run(self.kube.get_lease(self.namespace, self.name))
            now = time.monotonic()
            self._seen = observe(lease, self._seen, now)
            want = claim(
                lease,
                self.namespace,
                self.name,
                self.identity,
                self._seen,
                now,
                datetime.now(UTC),
                self.timing,
            )
            if want is None:
                return Outcome.OTHER
            written = self._run(self.kube.write_lease(want))
        except Exception as exc:  # the API server away or refusing: try again, up to a deadline
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return Outcome.FAILED
        if written is None:
            return Outcome.FAILED
        self._lease = written
        return Outcome.HELD

    @property
    def _holder(self) -> str:
        """The holder of the lease as last read ("" when none, or not read yet)."""
        return self._seen.record[0] if self._seen else ""

    def _pause(self) -> None:
        # Jittered, as client-go's JitterUntil, so that candidates started together spread out.
        self._stop.wait(self.timing.retry_seconds * (1 + 0.2 * random.random()))

    def acquire(self, standing_by: Callable[[], None] = lambda: None) -> None:
        """Block until this process holds the lease; `standing_by` is called once, when it
        first finds another holder's lease current."""
        waiting_on, stood_by = None, False
        while (outcome := self._try()) is not Outcome.HELD:
            # Said before the standby answers its probes, so that whoever sees it stand by can
            # read why in the log.
            if self._holder and self._holder != waiting_on:
                waiting_on = self._holder
                log.info(
                    "waiting for lease %s/%s, held by %s", self.namespace, self.name, waiting_on
                )
            if outcome is Outcome.OTHER and not stood_by:
                stood_by = True
                standing_by()
            self._pause()
        log.info("holding lease %s/%s as %s", self.namespace, self.name, self.identity)
        self.hold()

    def hold(self) -> None:
        """Renew the lease just acquired, from a thread of its own, until `release`."""
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        # The deadline is kept by a thread of its own: a renewal can hang in a request (its
        # connect and read timeouts, retried) far longer than the lease lasts, and the others
        # take over once it has expired.
        threading.Thread(target=self._keep_deadline, name="lease-deadline", daemon=True).start()
        while not self._stop.is_set() and not self.lost.is_set():
            self._pause()
            if self._stop.is_set():
                return
            outcome = self._try()
            if outcome is Outcome.HELD:
                self._renewed = time.monotonic()
            elif outcome is Outcome.OTHER:
                self._lose()

    def _keep_deadline(self) -> None:
        while not self._stop.wait(self.timing.retry_seconds / 2):
            if time.monotonic() - self._renewed > self.timing.renew_deadline_seconds:
                self._lose()
            if self.lost.is_set():
                return

    def _lose(self) -> None:
        """Stop acting (on_lost), once: another holder has the lease, or it was not renewed
        within the deadline."""
        with self._losing:
            if self.lost.is_set() or self._stop.is_set():
                return
            self.lost.set()
        log.error(
            "lost lease %s/%s (held by %r, last renewed %.1fs ago): stopping",
            self.namespace, self.name, self._holder, time.monotonic() - self._renewed,
        )  # fmt: skip
        self.on_lost()

    def release(self) -> None:
        """Stop renewing and leave the lease free for the next candidate (unless it was lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timing.retry_seconds * 3)
        try:
            if not self.lost.is_set() and self._lease is not None:
                lease = self._run(self.kube.get_lease(self.namespace, self.name))
                free = released(lease, self.identity, datetime.now(UTC)) if lease else None
                if free is not None and self._run(self.kube.write_lease(free)) is not None:
                    log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # the next holder waits out the lease instead
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, exc)
        finally:
            self._run(self.kube.close())


def lease_client(timing: Timing, configuration: client.Configuration | None = None) -> Kube:
    """The API client of the lease's requests: one at a time, each given up after the renew
    deadline and not retried (the loop retries), as client-go's leader election bounds its own
    client. With the operator's 60 s read timeout, retried, a waiting candidate whose request
    hung (a connection gone dead) could not take over for minutes."""
    seconds = timing.renew_deadline_seconds
    return Kube(configuration, max_requests=1, request_timeout=(seconds, seconds), retries=0)


def own_namespace() -> str:
    """The namespace of this pod's service account; `default` outside a cluster."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def from_env(env: Mapping[str, str] = os.environ) -> LeaseHolder | None:
    """The holder that FINETUNE_LEADER_ELECTION=true asks for, on the Lease
    FINETUNE_LEADER_ELECTION_LEASE (default `finetune-operator`) in
    FINETUNE_LEADER_ELECTION_NAMESPACE (default: the pod's own); None when it is off."""
    if env.get("FINETUNE_LEADER_ELECTION", "false").lower() != "true":
        return None
    seconds = float(env.get("FINETUNE_LEADER_ELECTION_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS)
    timing = Timing.for_lease(seconds)
    return LeaseHolder(
        lease_client(timing),
        env.get("FINETUNE_LEADER_ELECTION_NAMESPACE") or own_namespace(),
        env.get("FINETUNE_LEADER_ELECTION_LEASE") or DEFAULT_LEASE,
        # client-go's identity: the host (the pod's name) and a unique suffix, so that a
        # restarted container is a new candidate, not the holder it replaced.
        f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
        timing,
    )
