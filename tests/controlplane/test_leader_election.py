"""Leader election (operator/finetune_operator/leader.py) with real operator processes against a
real API server: only the holder of the Lease acts; the next one takes over at once when the
holder exits, and after the lease's duration when the holder stops renewing; and a holder that
finds its lease taken stops acting and exits non-zero, to wait for it again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import ftj_manifest
from fixtures.kube import Kube
from fixtures.operator import Operator

from finetune_operator.leader import DEFAULT_LEASE, micro_time

pytest_plugins = ["fixtures.operator"]

# Short, so that the expiry case waits seconds (client-go's proportions: renew within 4 s,
# retry every 0.8 s).
LEASE_SECONDS = 6


@pytest.fixture
def lease_namespace(kube: Kube) -> Iterator[str]:
    ns = kube.create_namespace("ftj-lease")
    yield ns
    kube.delete("Namespace", ns, missing_ok=True)


def candidate(kubeconfig: str, log: Path, namespace: str) -> Operator:
    return Operator(
        kubeconfig,
        log,
        {
            "FINETUNE_LEADER_ELECTION": "true",
            "FINETUNE_LEADER_ELECTION_NAMESPACE": namespace,
            "FINETUNE_LEADER_ELECTION_LEASE_SECONDS": str(LEASE_SECONDS),
            # Only this namespace: no other test's FineTuneJobs.
            "FINETUNE_WATCH_NAMESPACES": namespace,
        },
    )


def test_only_the_lease_holder_acts_and_the_next_one_takes_over(
    kubeconfig: str,
    crd: str,
    kube: Kube,
    lease_namespace: str,
    tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    ns = lease_namespace

    def spec() -> dict[str, Any]:
        lease = kube.get("Lease", DEFAULT_LEASE, ns)
        return (lease or {}).get("spec") or {}

    def job_made(name: str) -> Callable[[], bool]:
        return lambda: kube.get("Job", name, ns) is not None

    first, second, third, fourth = (
        candidate(kubeconfig, tmp_path / f"{n}.log", ns) for n in "abcd"
    )
    try:
        first.start()
        holder = spec()["holderIdentity"]
        assert f"holding lease {ns}/{DEFAULT_LEASE} as {holder}" in first.logs()
        # It took the free lease at once: it leads, and kopf answers its probe.
        assert first.leader_gauge() == 1

        # The second waits for the lease, with kopf not started: it acts on nothing. It stands
        # by: its probe answers (a Ready pod, not restarted), and its metrics say it does not
        # lead.
        second.start(wait=False)
        wait_until(second.standing_by, message="the second one standing by")
        assert f"held by {holder}" in second.logs()
        assert second.leader_gauge() == 0
        kube.create(ftj_manifest("one", ns))
        wait_until(job_made("one"), message="the holder making job one's Job")
        assert second.standing_by()

        # The holder exits (SIGTERM, a pod's deletion): it releases the lease, and the second
        # takes it without waiting out the lease.
        first.stop()
        assert first.proc is not None and first.proc.returncode == 0, first.logs()[-3000:]
        assert f"released lease {ns}/{DEFAULT_LEASE}" in first.logs()
        # kopf answers its probe now (the standby's endpoint gave the port up), and its metrics
        # say it leads.
        wait_until(second.healthy, message="the second one taking over")
        assert second.leader_gauge() == 1
        taken = spec()
        assert taken["holderIdentity"] not in ("", holder)
        assert taken["leaseTransitions"] == 1
        kube.create(ftj_manifest("two", ns))
        wait_until(job_made("two"), message="the new holder making job two's Job")

        # Another writer takes the lease (a holder this one could not see): this one stops
        # acting and exits non-zero.
        now = micro_time(datetime.now(UTC))
        kube.patch("Lease", DEFAULT_LEASE, ns, {"spec": {"holderIdentity": "x", "renewTime": now}})
        assert second.proc is not None
        wait_until(lambda: second.proc.poll() is not None, message="the second one stopping")
        assert second.proc.returncode == 1, second.logs()[-3000:]
        assert f"lost lease {ns}/{DEFAULT_LEASE} (held by 'x'" in second.logs()

        # "x" never renews: the third takes over once the lease has expired.
        third.start(wait=False)
        wait_until(third.healthy, message="the third one taking over the expired lease")
        assert "held by x" in third.logs()
        final = spec()
        assert final["holderIdentity"] not in ("", "x", taken["holderIdentity"])
        assert final["leaseTransitions"] == 2

        # A standby stops at SIGTERM, at once and cleanly, though kopf, which handles SIGTERM
        # once it runs, never started (in a container, as PID 1, it would ignore the signal).
        fourth.start(wait=False)
        wait_until(fourth.standing_by, message="the fourth one standing by")
        fourth.stop()
        assert fourth.proc is not None and fourth.proc.returncode == 0, fourth.logs()[-3000:]
        assert "stopped (SIGTERM) before kopf ran" in fourth.logs()
        assert spec()["holderIdentity"] == final["holderIdentity"]
    finally:
        for op in (first, second, third, fourth):
            op.stop()
