"""Operator scale benchmark against the local control plane (no kubelet).

    python benchmarks/operator_scale.py [--label after] [--scenarios published,scale]

Each scenario gets a fresh control plane (hack/controlplane.sh, binaries from hack/k8s-build.sh)
and a fresh operator subprocess, unless $KUBECONFIG is set, in which case every scenario shares
that cluster. The operator is `python -m finetune_operator` as $PYTHONPATH finds it, or as
--operator-pythonpath does: the same driver measures another checkout's operator, e.g.

    python benchmarks/operator_scale.py --label before \
        --operator-pythonpath /tmp/before/api:/tmp/before/operator \
        --crd /tmp/before/crds/finetune.dev_finetunejobs.yaml

- published: apply → Job-exists latency (p50/p99) for 100 FineTuneJobs applied one at a time on
  an empty cluster, then the time until a burst of 500 all have their Jobs.
- scale: a burst of 2,000 FineTuneJobs and the time until all have their Jobs; once the operator
  has digested the burst (its CPU drops under --settle-busy of a core), apply → Job latency one
  at a time again while the 2,000 exist, their resync timers running.

- restart: --restart-jobs FineTuneJobs finished (their pods exit 0, as the tests' kubelet
  reports) and then their Jobs and pods deleted, as ttlSecondsAfterFinished leaves a long
  history, and one live job whose Job is deleted while the operator is down; then the operator
  starts: the time until it has made the live job's Job again, and the passes it ran by then
  and until it settled. restart-kept: the same with the finished jobs' Jobs and pods kept (no
  TTL, the default).

Bursts are created from --clients threads. Each reports the operator's peak RSS and CPU seconds
from /proc. Jobs are seen through a watch, not by polling. Results are merged into
benchmarks/results/operator_scale.json under --label, so one file holds before and after runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "controlplane"))
from fixtures.cluster import (  # noqa: E402
    ftj_manifest,
    patch_pod_status,
    terminated_status,
)
from fixtures.kube import Kube  # noqa: E402
from fixtures.operator import CRD_FILE, Operator, install_crd  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "operator_scale.json"
JOB_LABEL = "finetune.dev/job-name"
PUSHED = {"status": "Succeeded", "reason": "PushedToHub", "message": "pushed", "steps": 10}


@contextmanager
def control_plane() -> Iterator[str]:
    """A kubeconfig: $KUBECONFIG's cluster, or a fresh local control plane torn down after."""
    if os.environ.get("KUBECONFIG"):
        yield os.environ["KUBECONFIG"]
        return
    subprocess.run([str(REPO / "hack" / "k8s-build.sh"), "controlplane"], check=True)
    env = dict(os.environ, CONTROLPLANE_DIR=tempfile.mkdtemp(prefix="ft-bench-"))
    env["CONTROLPLANE_WATCH_PID"] = str(os.getpid())
    script = str(REPO / "hack" / "controlplane.sh")
    up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, check=True)
    try:
        yield up.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True)


class JobWatcher(threading.Thread):
    """Records when each Job of one namespace is first seen, from a watch."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.namespace = kube, namespace
        self.seen: dict[str, float] = {}
        self.changed = threading.Condition()
        # Start from a list's resourceVersion, so no Job created after it can be missed.
        listing = kube.request("GET", kube.path("Job", namespace))
        self.resource_version = listing["metadata"]["resourceVersion"]

    def run(self) -> None:
        try:
            for event in self.kube.watch("Job", self.namespace, self.resource_version):
                name = event["object"]["metadata"]["name"]
                if name not in self.seen:
                    with self.changed:
                        self.seen[name] = time.perf_counter()
                        self.changed.notify_all()
        except Exception:  # the control plane goes away at the end of the run
            return

    def wait_for(self, names: set[str], timeout: float) -> int:
        """Block until every name has a Job or `timeout` passes; how many have one."""
        deadline = time.perf_counter() + timeout
        with self.changed:
            while not names <= self.seen.keys():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.changed.wait(min(left, 1.0))
            return len(names & self.seen.keys())


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return {"peak_rss_mib": round(hwm / 1024, 1), "cpu_seconds": round(cpu, 2)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def settle(pid: int, busy: float, window: float = 5, timeout: float = 300) -> float:
    """Seconds until the operator uses under `busy` of a core over `window` seconds: when it
    has digested a burst (the Job controller's status updates each trigger a pass)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        before = proc_stats(pid)["cpu_seconds"]
        time.sleep(window)
        if (proc_stats(pid)["cpu_seconds"] - before) / window < busy:
            break
    return round(time.perf_counter() - started, 2)


def latency(
    kube: Kube, watcher: JobWatcher, ns: str, prefix: str, n: int, timeout: float
) -> dict[str, Any]:
    """Apply FineTuneJobs one at a time; each waits for its Job before the next is applied.
    A Job not seen within `timeout` counts as `timeout` and in `timed_out`."""
    latencies, timed_out = [], 0
    for i in range(n):
        name = f"{prefix}-{i}"
        started = time.perf_counter()
        kube.create(ftj_manifest(name, ns, resources={"nodes": 1}))
        if not watcher.wait_for({name}, timeout):
            timed_out += 1
        latencies.append(min(watcher.seen.get(name, float("inf")) - started, timeout))
    return {
        "jobs": n,
        "timed_out": timed_out,
        "p50": round(statistics.median(latencies), 3),
        "p99": round(percentile(latencies, 0.99), 3),
        "max": round(max(latencies), 3),
        "samples": [round(x, 3) for x in latencies],
    }


def burst(
    kube: Kube, watcher: JobWatcher, ns: str, prefix: str, n: int, timeout: float, clients: int
) -> dict[str, Any]:
    """Create n FineTuneJobs from `clients` threads; time until every one has its Job."""
    names = [f"{prefix}-{i}" for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(
            pool.map(
                lambda name: kube.create(ftj_manifest(name, ns, resources={"nodes": 1})), names
            )
        )
    applied = time.perf_counter() - started
    created = watcher.wait_for(set(names), timeout)
    return {
        "jobs": n,
        "apply_seconds": round(applied, 2),
        "all_jobs_exist_seconds": round(time.perf_counter() - started, 2),
        "jobs_created": created,
    }


def finish(kube: Kube, ns: str, names: list[str], clients: int, timeout: float) -> None:
    """Play the kubelet for one-pod jobs: each pod exits 0 with a TrainerResult; the Job
    controller completes the Job and the operator records the job Succeeded."""
    deadline = time.perf_counter() + timeout
    wanted, pods = set(names), {}
    while wanted - pods.keys():  # the Job controller makes the pods after the Jobs
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no pods for {sorted(wanted - pods.keys())[:5]}...")
        for pod in kube.list("Pod", ns, labels=JOB_LABEL):
            pods.setdefault(pod["metadata"]["labels"][JOB_LABEL], pod)
        time.sleep(0.5)
    status = {
        p["metadata"]["name"]: terminated_status(p, 0, json.dumps(PUSHED))
        for p in pods.values()
        if p["metadata"]["labels"][JOB_LABEL] in wanted
    }
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda item: patch_pod_status(kube, ns, *item), status.items()))
    while time.perf_counter() < deadline:
        phases = {
            f["metadata"]["name"]: f.get("status", {}).get("phase")
            for f in kube.list("FineTuneJob", ns)
        }
        if all(phases.get(n) == "Succeeded" for n in names):
            return
        time.sleep(1)
    raise TimeoutError(f"finished jobs not all Succeeded after {timeout}s")


def passes(op: Operator) -> int:
    """Reconcile passes the operator has run (its duration histogram's count)."""
    for line in op.metrics().splitlines():
        if line.startswith("finetune_operator_reconcile_duration_seconds_count"):
            return int(float(line.split()[-1]))
    return 0


def restart(
    kube: Kube,
    op: Operator,
    watcher: JobWatcher,
    ns: str,
    args: argparse.Namespace,
    keep_jobs: bool,
) -> dict[str, Any]:
    """Finished jobs (their Jobs kept, or gone) and one live one, whose Job goes while the
    operator is down; then the time from the operator's start until it has made that Job
    again."""
    made = burst(kube, watcher, ns, "done", args.restart_jobs, args.timeout, args.clients)
    done = [f"done-{i}" for i in range(args.restart_jobs)]
    finish(kube, ns, done, args.clients, args.timeout)
    kube.create(ftj_manifest("live", ns, resources={"nodes": 1}))
    watcher.wait_for({"live"}, args.timeout)
    settle(op.proc.pid, args.settle_busy)  # type: ignore[union-attr]
    op.stop()
    gone = ["live"] if keep_jobs else ["live", *done]
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(lambda name: kube.delete("Job", name, ns), gone))
    # Their pods too (the garbage collector's), as a TTL leaves none.
    while any(kube.list("Pod", ns, labels=f"{JOB_LABEL}={name}") for name in gone[:1]) or (
        not keep_jobs and (kube.list("Job", ns) or kube.list("Pod", ns))
    ):
        time.sleep(0.5)
    again = JobWatcher(kube, ns)
    again.start()
    started = time.perf_counter()
    op.start()
    ready = time.perf_counter() - started
    again.wait_for({"live"}, args.timeout)
    repaired = again.seen.get("live", float("inf")) - started
    return {
        "finished_jobs": args.restart_jobs,
        "jobs_created": made["jobs_created"],
        "operator_ready_seconds": round(ready, 2),
        "start_to_live_job_repaired_seconds": round(repaired, 2),
        "passes_by_then": passes(op),
        "settle_seconds_after_start": settle(op.proc.pid, args.settle_busy),  # type: ignore[union-attr]
        "passes_until_settled": passes(op),
    }


def scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with control_plane() as kubeconfig:
        # The burst's threads, the watch and the latency loop each hold a connection.
        kube = Kube(kubeconfig, connections=args.clients + 2)
        install_crd(kube, args.crd)
        ns = kube.create_namespace(f"bench-{name}")
        tree = {"PYTHONPATH": args.operator_pythonpath} if args.operator_pythonpath else {}
        op = Operator(kubeconfig, Path(tempfile.mkdtemp()) / "operator.log", extra_env=tree)
        op.start()
        assert op.proc is not None
        watcher = JobWatcher(kube, ns)
        watcher.start()
        result: dict[str, Any] = {}
        try:
            if name == "published":
                result["apply_to_job_latency_seconds"] = latency(
                    kube, watcher, ns, "lat", args.latency_jobs, args.latency_timeout
                )
                result["after_latency_phase"] = proc_stats(op.proc.pid)
                result["burst"] = burst(
                    kube, watcher, ns, "burst", args.burst_jobs, args.timeout, args.clients
                )
            elif name in ("restart", "restart-kept"):
                result.update(restart(kube, op, watcher, ns, args, name == "restart-kept"))
            else:
                result["burst"] = burst(
                    kube, watcher, ns, "scale", args.scale_jobs, args.timeout, args.clients
                )
                result["after_burst"] = proc_stats(op.proc.pid)
                # Jobs exist before the operator has digested the burst; the latency below is
                # that of an operator that has, with the 2,000 and their resync timers.
                result["settle_seconds"] = settle(op.proc.pid, args.settle_busy)
                result["apply_to_job_latency_seconds_while_scale_jobs_exist"] = latency(
                    kube, watcher, ns, "lat", args.scale_latency_jobs, args.latency_timeout
                )
            result["operator"] = proc_stats(op.proc.pid)
        finally:
            op.stop()
            kube.delete("Namespace", ns, missing_ok=True)
            kube.close()
        return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="after", help="key of this run in the results file")
    parser.add_argument("--scenarios", default="published,scale")
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--burst-jobs", type=int, default=500)
    parser.add_argument("--scale-jobs", type=int, default=2000)
    parser.add_argument("--scale-latency-jobs", type=int, default=50)
    parser.add_argument("--restart-jobs", type=int, default=500)
    parser.add_argument("--latency-timeout", type=float, default=30)
    parser.add_argument("--clients", type=int, default=4, help="threads creating a burst")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--settle-busy", type=float, default=0.5, help="operator CPU share that counts as settled"
    )
    parser.add_argument(
        "--operator-pythonpath", default="", help="PYTHONPATH of the operator measured"
    )
    parser.add_argument(
        "--crd", type=Path, default=CRD_FILE, help="the CRD of the operator measured"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--note", default="", help="free text stored with the run")
    args = parser.parse_args()

    run: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": args.note,
        "pythonpath": args.operator_pythonpath or os.environ.get("PYTHONPATH", ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for name in args.scenarios.split(","):
        run[name] = scenario(name, args)
        print(json.dumps({name: run[name]}, indent=2), flush=True)
    run["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("runs", {})[args.label] = run
    results["machine"] = {
        "kubernetes": "v1.34.4",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
