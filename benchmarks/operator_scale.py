"""Operator scale benchmark against the local control plane (no kubelet).

    python benchmarks/operator_scale.py [--latency-jobs 100] [--burst-jobs 500]

Uses $KUBECONFIG if set, else starts the control plane with hack/controlplane.sh (binaries from
hack/k8s-build.sh). Measures: apply → Job-exists latency (p50/p99) for jobs applied one at a time;
the time until a burst of FineTuneJobs all have their Jobs; and the operator subprocess's peak RSS
and CPU seconds from /proc. Writes benchmarks/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lightkube import Client, codecs
from lightkube.config.kubeconfig import KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Namespace  # noqa: F401 - registers the kind

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "controlplane"))
from fixtures.cluster import ftj_manifest  # noqa: E402
from fixtures.operator import Operator  # noqa: E402

FTJ = create_namespaced_resource("finetune.dev", "v1alpha1", "FineTuneJob", "finetunejobs")
OUT = REPO / "benchmarks" / "results" / "operator_scale.json"


def start_control_plane() -> tuple[str, dict[str, str] | None]:
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"], None
    subprocess.run([str(REPO / "hack" / "k8s-build.sh"), "controlplane"], check=True)
    env = dict(os.environ, CONTROLPLANE_DIR=tempfile.mkdtemp(prefix="ft-bench-"))
    env["CONTROLPLANE_WATCH_PID"] = str(os.getpid())
    up = subprocess.run(
        [str(REPO / "hack" / "controlplane.sh"), "up"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return up.stdout.strip().splitlines()[-1], env


class JobWatcher(threading.Thread):
    """Records when each Job is first seen, from a watch (not polling)."""

    def __init__(self, client: Client, namespace: str) -> None:
        super().__init__(daemon=True)
        self.client, self.namespace = client, namespace
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            for _op, job in self.client.watch(Job, namespace=self.namespace):
                with self.lock:
                    self.seen.setdefault(job.metadata.name, time.perf_counter())
        except Exception:  # the control plane goes away at the end of the run
            return

    def count(self, names: set[str]) -> int:
        with self.lock:
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--burst-jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    kubeconfig, cp_env = start_control_plane()
    kubectl = [
        str(Path.home() / ".cache/finetune-operator/k8s/v1.34.4/bin/kubectl"),
        f"--kubeconfig={kubeconfig}",
    ]
    subprocess.run(
        [
            *kubectl,
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            str(REPO / "crds" / "finetune.dev_finetunejobs.yaml"),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *kubectl,
            "wait",
            "--for=condition=Established",
            "crd/finetunejobs.finetune.dev",
            "--timeout=60s",
        ],
        check=True,
        capture_output=True,
    )
    client = Client(config=KubeConfig.from_file(kubeconfig), field_manager="benchmark")
    ns = f"bench-{secrets.token_hex(3)}"
    client.create(
        codecs.from_dict({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    )
    log = Path(tempfile.mkdtemp()) / "operator.log"
    op = Operator(kubeconfig, log)
    op.start()
    assert op.proc is not None
    watcher = JobWatcher(client, ns)
    watcher.start()
    time.sleep(1)  # let the watch establish before the first apply
    result: dict[str, Any] = {"kubernetes": "v1.34.4", "cpus": os.cpu_count()}
    try:
        latencies = []
        for i in range(args.latency_jobs):
            name = f"lat-{i}"
            doc = ftj_manifest(name, ns, resources={"nodes": 1})
            started = time.perf_counter()
            client.create(FTJ.from_dict(doc))  # type: ignore[attr-defined]
            deadline = started + 60
            while name not in watcher.seen and time.perf_counter() < deadline:
                time.sleep(0.005)
            latencies.append(watcher.seen.get(name, float("nan")) - started)
        result["apply_to_job_latency_seconds"] = {
            "jobs": len(latencies),
            "p50": round(statistics.median(latencies), 3),
            "p99": round(percentile(latencies, 0.99), 3),
            "max": round(max(latencies), 3),
        }
        result["after_latency_phase"] = proc_stats(op.proc.pid)

        names = {f"burst-{i}" for i in range(args.burst_jobs)}
        started = time.perf_counter()
        for name in sorted(names):
            client.create(FTJ.from_dict(ftj_manifest(name, ns, resources={"nodes": 1})))  # type: ignore[attr-defined]
        applied = time.perf_counter() - started
        deadline = started + args.timeout
        while watcher.count(names) < len(names) and time.perf_counter() < deadline:
            time.sleep(0.1)
        result["burst"] = {
            "jobs": len(names),
            "apply_seconds": round(applied, 2),
            "all_jobs_exist_seconds": round(time.perf_counter() - started, 2),
            "jobs_created": watcher.count(names),
        }
        result["operator"] = proc_stats(op.proc.pid)
    finally:
        op.stop()
        subprocess.run([*kubectl, "delete", "namespace", ns, "--wait=false"], capture_output=True)
        if cp_env is not None:
            subprocess.run(
                [str(REPO / "hack" / "controlplane.sh"), "down"], env=cp_env, capture_output=True
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
