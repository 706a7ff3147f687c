"""The fault suite on kind: real kubelets, a real Job controller, faults injected into training
FineTuneJobs, and what the operator and the trainer make of each.

    pytest -m kind tests/kind/test_faults.py -s     # fixtures: tests/kind/conftest.py

One module-scoped setup keeps it lean: one namespace, one Hub double (tests/kind/manifests/hub.yaml,
started with --test-faults) and one Hub token, and every job applied at once, each driven by its
own scenario thread while the others train; the tests then wait for their scenario and assert.
The 2-node jobs are examples/tiny-cpu.yaml (40 steps, seed 7) checkpointing every 5 steps:

- ft-chain: the operator pod and rank 1's pod are deleted together (the Job controller replaces
  the pod and the gang rejoins it with no operator running, in place; the new operator must
  record that restart); then rank 0's pod, the attempt's second stop, which restarts the gang as
  attempt 2 (the Job controller would wait twice as long to replace it). Each restart resumes
  from the SIGTERM checkpoint;
- ft-drain: `kubectl drain` of the worker node (only this job's pods are evicted, so the Hub
  double, the operator and CoreDNS stay), then uncordon: the evicted pod is replaced in place;
  once the gang trains again, runPolicy.suspend true, and false once its pods are gone: the same
  attempt resumes from the SIGTERM checkpoint (two faults a job, balanced, so that no job's
  chain decides the wall time);
- ft-hang: rank 1's trainer process stopped with SIGSTOP (kubectl exec); rank 0's watchdog ends
  the attempt after hangTimeoutSeconds=20 (CollectiveTimeout) and the gang restarts from its last
  periodic checkpoint. The stopped pod ends on its SIGTERM, which its launcher follows with
  SIGCONT, not at the kubelet's SIGKILL after terminationGracePeriodSeconds (60 here); its
  evaluation gate cannot pass, so it ends EvaluationGateFailed and nothing reaches the repo's main
  branch;
- ft-push503 / ft-push403 (1 node, 10 steps): the double fails the job's commits (scoped to its
  repo) with 503 three times (retried in the pod: Succeeded, one push) or with 403 (Failed,
  PushFailed, no second attempt). ft-push403 is then made again with `finetune retry`, as a user
  would once the token is fixed: the claim the operator made outlived it (claimRetentionPolicy),
  and the new one adopts it and pushes the result kept there without training.
- ft-full (1 node, 10 steps; on kind's own nodes only): its checkpoints are on a claim of yours,
  a local PersistentVolume on a tmpfs of the control-plane node's, with room for the model and
  data it caches there and less than two checkpoints: it fails at once, before training, with
  InvalidSpec naming spec.output.checkpoints.size (one attempt). Then the tmpfs is made larger,
  as a claim is expanded, and the job made again on the same claim trains and pushes.

Each 2-node job's perplexity after training must match the uninterrupted run of the same spec:
test_e2e.py's, when it ran earlier in the session, else an `ft-ref` job trained alongside. At the
end: no two attempts' pods ever alive together, exactly one Job/Service/ConfigMap per job, pods of
the current attempt only, and the Hub token in no log, Event or status.

Pods and FineTuneJobs are followed with `kubectl get --watch` (every change, with the time it
arrived), so restart times are measured from the fault to the operator's first report of the
gang training again (and to rank 0's own resume time, `lastResumeTime`), and termination
messages are read even from pods deleted a moment later.
Timings (restart seconds, operator convergence, each scenario) land in
test-results/kind-e2e-timings.json, every trainer pod's log in test-results/kind-faults-pod-logs/;
a failure leaves diagnostics in test-results/kind-logs/faults-<time>/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import test_e2e
from kind_tools import DOCKER, control_plane_node, epoch, is_ready, run, worker_node
from test_e2e import example_job, finetune_cli, setup_hub, training_key

import conftest

pytestmark = [pytest.mark.kind]

T = TypeVar("T")
Obj = dict[str, Any]

JOB_LABEL = "finetune.dev/job-name"
ATTEMPT_LABEL = "finetune.dev/attempt"
INDEX = "batch.kubernetes.io/job-completion-index"
# A FineTuneJob's phases (and condition types) once it has finished.
FINISHED = ("Succeeded", "Failed")
CKPT_EVERY = 5
HANG_TIMEOUT_S = 20
# ft-hang's template.terminationGracePeriodSeconds. Its stopped rank acts on the pod's SIGTERM
# only because the launcher follows it with SIGCONT; otherwise the kubelet's SIGKILL would end it
# (exit 137) once this is up, and the restart would wait for that.
HANG_GRACE_S = 60
PUSH_STEPS = 10
# Faults strike once the attempt has trained this many steps past where it began.
FAULT_AFTER_STEPS = 3
# Any single wait (cold, on 2 shared cores); the whole module stays far below it when warm.
WAIT_S = 900
# Perplexity after an interrupted run vs the uninterrupted one: resumption restores weights,
# optimizer, schedule, data position and RNG, so they agree to float noise; this is slack.
PPL_TOLERANCE = 0.02
# How long the new operator may take to bring every training job's status up to date once its
# pod is ready: a behaviour bound (it converges), not a speed target. The time is a figure of the
# run (faults_operator_ready_to_converged); a CI run on a loaded machine took 12.8 s, where the
# operator's first passes share 2 cores with ten training pods.
CONVERGE_S = 120.0
PUSH503_COUNT = 3
FULL = "ft-full"
# ft-full's room beside the model and data: less than two of its checkpoints (its LoRA weights
# and their AdamW moments, 2.8Mi); then room for many.
FULL_ROOM, LARGER_ROOM = 2 * 2**20, 64 * 2**20

RESUMED = re.compile(r"resumed from step (\d+)")
# Lines of a trainer pod's log that mark where a restart's seconds went: the trainer imported
# (its metrics served), the gang formed (each rank says which it is once its process group is
# up). The pods log in UTC, to the millisecond, on the clock kind's nodes share with this host.
IMPORTED = re.compile(r"^(\S+ \S+) .*finetune_trainer\.train: metrics on ", re.M)
FORMED = re.compile(r"^(\S+ \S+) .*\] rank \d+ of \d+ on ", re.M)
CHAIN, DRAIN, HANG, P503, P403, REF = (
    "ft-chain",
    "ft-drain",
    "ft-hang",
    "ft-push503",
    "ft-push403",
    "ft-ref",
)

# Stops every trainer rank process of the pod: the children of PID 1, the launcher (`finetune
# train`, which forks them), but not the launcher itself, nor this script (kubectl exec's).
SIGSTOP_RANKS = r"""
import os, signal
me, hit = os.getpid(), []
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) in (1, me):
        continue
    try:
        stat = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    if int(stat.rsplit(")", 1)[1].split()[1]) == 1:
        os.kill(int(p), signal.SIGSTOP)
        hit.append(int(p))
print(hit)
"""

# Runs in the hub pod: one call to the double's /_test/faults (no token needed there).
HUB_CALL = r"""
import json, sys, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None
req = urllib.request.Request(url, data=body, method=method)
with urllib.request.urlopen(req, timeout=10) as r:
    print(r.read().decode())
"""


# ---- watching the cluster --------------------------------------------------------------------


class View:
    """What `kubectl get --watch` streams of the namespace's FineTuneJobs and pods: the latest
    object per name, every FineTuneJob change with its arrival time, and the facts read off pod
    changes (trainer results, log followers, attempts alive together)."""

    def __init__(self, kube: Any, namespace: str, logs: Path) -> None:
        self.kube, self.ns, self.logs = kube, namespace, logs
        self.cond = threading.Condition()
        self.ftjs: dict[str, Obj] = {}
        self.ftj_history: list[tuple[float, str, Obj]] = []
        self.pods: dict[str, Obj] = {}
        # (job, attempt, rank) -> the trainer's result, from its termination message
        self.results: dict[tuple[str, int, int], Obj] = {}
        # pod name -> (exit code, result) of its trainer container
        self.exits: dict[str, tuple[int | None, Obj]] = {}
        self.overlaps: list[str] = []
        # pod name -> (job, attempt, rank), in the order the pods appeared
        self.pod_meta: dict[str, tuple[str, int, int]] = {}
        self.running_at: dict[str, float] = {}  # pod name -> when it was first seen Running
        self.disrupted: set[str] = set()  # pods with a DisruptionTarget condition (evicted)
        self._followers: dict[str, subprocess.Popen[bytes]] = {}
        self._watchers: dict[str, subprocess.Popen[str]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._stream, args=(r, f), daemon=True)
            for r, f in (("finetunejobs", self._on_ftj), ("pods", self._on_pod))
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for proc in [*self._watchers.values(), *self._followers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self._watchers.values(), *self._followers.values()]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _stream(self, resource: str, handle: Callable[[str, Obj], None]) -> None:
        args = [*self.kube.base, "-n", self.ns, "get", resource, "--watch"]
        args += ["--output-watch-events", "-o", "json"]
        while not self._stop.is_set():
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self._watchers[resource] = proc
            assert proc.stdout is not None
            decoder, buffer = json.JSONDecoder(), ""
            for line in proc.stdout:  # one compact object a line (or pretty-printed: buffered)
                buffer += line
                try:
                    event, _ = decoder.raw_decode(buffer.strip())
                except ValueError:
                    continue
                buffer = ""
                with self.cond:
                    try:
                        handle(event.get("type", ""), event.get("object") or {})
                    except Exception:  # a bug here must not silence the watch
                        self.errors.append(traceback.format_exc())
                    self.cond.notify_all()
                if self._stop.is_set():
                    break
            proc.terminate()
            proc.wait()
            if not self._stop.is_set():
                time.sleep(0.5)  # the watch timed out: watch again (a re-list, ADDED events)

    def _on_ftj(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.ftjs.pop(name, None)
            return
        self.ftjs[name] = obj
        self.ftj_history.append((time.monotonic(), name, obj))

    def _on_pod(self, kind: str, obj: Obj) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        if kind == "DELETED":
            self.pods.pop(name, None)
            return
        self.pods[name] = obj
        labels = meta.get("labels") or {}
        job = labels.get(JOB_LABEL)
        if job is None:
            return
        attempt, rank = int(labels.get(ATTEMPT_LABEL, 0)), pod_index(obj)
        self.pod_meta.setdefault(name, (job, attempt, rank))
        if (obj.get("status") or {}).get("phase") == "Running":
            self.running_at.setdefault(name, time.monotonic())
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(
            c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions
        ):
            self.disrupted.add(name)
        for cs in (obj.get("status") or {}).get("containerStatuses") or []:
            state = cs.get("state") or {}
            if cs.get("name") != "trainer":
                continue
            if (state.get("running") or state.get("terminated")) and name not in self._followers:
                self._follow(name)
            message = (state.get("terminated") or {}).get("message")
            if message:
                try:
                    self.results[(job, attempt, rank)] = json.loads(message)
                except ValueError:
                    self.results[(job, attempt, rank)] = {"raw": message[-500:]}
            if state.get("terminated"):
                code = state["terminated"].get("exitCode")
                self.exits[name] = (code, self.results.get((job, attempt, rank)) or {})
        alive = {
            int((p["metadata"].get("labels") or {}).get(ATTEMPT_LABEL, 0))
            for p in self.pods.values()
            if (p["metadata"].get("labels") or {}).get(JOB_LABEL) == job
            and (p.get("status") or {}).get("phase") in ("Pending", "Running")
        }
        if len(alive) > 1:
            self.overlaps.append(f"{job}: pods of attempts {sorted(alive)} alive at once")

    def _follow(self, pod: str) -> None:
        """`kubectl logs -f` into a file: the whole log survives the pod's deletion."""
        out = open(self.logs / f"{pod}.log", "wb")  # noqa: SIM115 - closed with the process
        self._followers[pod] = subprocess.Popen(
            [*self.kube.base, "-n", self.ns, "logs", "-f", pod, "-c", "trainer"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

    # -- reading -------------------------------------------------------------------------------

    def wait(
        self,
        what: str,
        probe: Callable[[], T | None],
        timeout: float = WAIT_S,
        job: str | None = None,
    ) -> T:
        """probe() (under the lock) until it returns something other than None or False. With
        `job`: what is awaited needs that FineTuneJob to run on, so the wait fails as soon as it
        has finished instead of at the timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = probe()
                if value is not None and value is not False:
                    return value
                left = deadline - time.monotonic()
                if job is not None and self.status(job).get("phase") in FINISHED:
                    raise AssertionError(f"{job} finished while waiting for {what}; {self.state()}")
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:.0f}s waiting for {what}; {self.state()}"
                    )
                self.cond.wait(min(left, 1.0))

    def state(self) -> str:
        """What a failed wait reports: each FineTuneJob's status, and how its pods exited."""
        exits: dict[str, list[Obj]] = {}
        for pod_name, (code, result) in self.exits.items():
            job = self.pod_meta.get(pod_name, ("?",))[0]
            exits.setdefault(job, []).append(
                {
                    "pod": pod_name,
                    "exitCode": code,
                    "reason": result.get("reason"),
                    "message": (result.get("message") or "")[:300],
                }
            )
        return (
            "FineTuneJobs: "
            + json.dumps(
                {n: {**summary(o), "exits": exits.get(n, [])} for n, o in self.ftjs.items()}
            )
            + (f"; watch errors: {self.errors[-1]}" if self.errors else "")
        )

    def status(self, job: str) -> Obj:
        return (self.ftjs.get(job) or {}).get("status") or {}

    def job_pods(self, job: str, attempt: int | None = None) -> list[Obj]:
        return [
            p
            for p in self.pods.values()
            if (p["metadata"].get("labels") or {}).get(JOB_LABEL) == job
            and (attempt is None or p["metadata"]["labels"].get(ATTEMPT_LABEL) == str(attempt))
        ]

    def log_texts(self) -> dict[str, str]:
        return {f.name: f.read_text(errors="replace") for f in sorted(self.logs.glob("*.log"))}

    def logged_after(self, pods: list[str], line: re.Pattern[str], since: float) -> float | None:
        """Seconds from `since` (epoch) to the last of these pods' first `line` after it: when
        the slowest pod got there. None where a pod's log has no such line (yet)."""
        times = []
        for pod in pods:
            path = self.logs / f"{pod}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            stamps = [log_epoch(m.group(1)) for m in line.finditer(text)]
            first = next((t for t in stamps if t >= since), None)
            if first is None:
                return None
            times.append(first - since)
        return round(max(times), 1) if times else None

    def resumed_in_log(self, job: str, attempt: int) -> int | None:
        """The step the newest rank-0 pod of `attempt` says it resumed from (its log)."""
        pods = [n for n, m in self.pod_meta.items() if m == (job, attempt, 0)]
        for pod in reversed(pods):
            path = self.logs / f"{pod}.log"
            found = RESUMED.findall(path.read_text(errors="replace")) if path.exists() else []
            if found:
                return int(found[-1])
        return None


def log_epoch(stamp: str) -> float:
    """Seconds since the epoch of a trainer log line's time ("2026-12-06 01:10:23,714", UTC)."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC).timestamp()


def pod_index(pod: Obj) -> int:
    meta = pod["metadata"]
    raw = (meta.get("annotations") or {}).get(INDEX) or (meta.get("labels") or {}).get(INDEX, "-1")
    return int(raw)


def summary(ftj: Obj) -> Obj:
    st = ftj.get("status") or {}
    return {
        "phase": st.get("phase"),
        "attempts": st.get("attempts"),
        "step": (st.get("progress") or {}).get("step"),
        "checkpoints": st.get("checkpoints"),
        # Why a finished job finished: the first thing to read when a wait for it failed.
        "finished": next(
            (
                f"{c.get('type')} {c.get('reason')}: {c.get('message')}"
                for c in st.get("conditions") or []
                if c.get("type") in FINISHED and c.get("status") == "True"
            ),
            None,
        ),
    }


def training_attempt(view: View, job: str) -> tuple[int, int] | None:
    """(attempt, step) of the attempt whose training the operator has seen, or None."""
    st = view.status(job)
    ckpt = st.get("checkpoints") or {}
    attempt, step = ckpt.get("attempt"), (st.get("progress") or {}).get("step")
    if attempt is None or step is None or attempt != st.get("attempts"):
        return None
    return int(attempt), int(step)


def condition(ftj_status: Obj, type_: str) -> Obj:
    return next((c for c in ftj_status.get("conditions") or [] if c["type"] == type_), {})


# ---- the suite -------------------------------------------------------------------------------


class Outcome:
    """A scenario's record, or the error that ended it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.record: Obj = {}
        self.error: str | None = None

    def finish(self, error: str | None = None) -> None:
        self.error = error
        self._done.set()

    def get(self, timeout: float) -> Obj:
        assert self._done.wait(timeout), f"scenario still running after {timeout:.0f}s"
        if self.error:
            raise AssertionError(f"the scenario failed:\n{self.error}")
        return self.record


@dataclass
class Suite:
    kube: Any
    ns: str
    hub: Any
    token: str
    release: dict[str, str]
    timing: Any
    view: View
    worker: str
    reference: float | None = None
    reference_source: str = ""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    restarts: list[Obj] = field(default_factory=list)
    operator_logs: dict[str, str] = field(default_factory=dict)
    # job -> when (Unix time) a scenario last struck its gang: a fault that need not change its
    # pods (SIGSTOP) still stops its progress.
    struck: dict[str, float] = field(default_factory=dict)
    # The job whose scenario restarts the operator, while it does: faults on the other jobs wait
    # (strike), so that some job trains through the restart untouched and shows that the new
    # operator brings its status up to date. CI runs met the case where every job it picked was
    # struck (or ended) meanwhile, and it had none to check.
    restarting: str | None = None
    calm: threading.Condition = field(default_factory=threading.Condition)
    failed: bool = False

    def outcome(self, name: str) -> Outcome:
        return self.outcomes.setdefault(name, Outcome())

    def run(self, name: str, scenario: Callable[[Suite, Obj], None]) -> None:
        outcome = self.outcome(name)

        def main() -> None:
            t0 = time.monotonic()
            try:
                scenario(self, outcome.record)
            except BaseException:  # reported by the test that reads the outcome
                outcome.finish(traceback.format_exc())
            else:
                outcome.finish()
            finally:
                self.timing.record(f"faults_scenario_{name}", time.monotonic() - t0)

        threading.Thread(target=main, name=name, daemon=True).start()

    def hub_faults(self, method: str, order: Obj | None = None) -> Obj:
        out = self.kube(
            "-n", self.ns, "exec", "deploy/hub", "-c", "hub", "--", "python", "-c", HUB_CALL,
            method, f"{self.hub.endpoint}/_test/faults", json.dumps(order) if order else "",
            timeout=60,
        )  # fmt: skip
        return json.loads(out.strip().splitlines()[-1])

    # -- steps scenarios share -------------------------------------------------------------------

    def wait_trained(self, job: str, attempt: int, steps: int = FAULT_AFTER_STEPS) -> int:
        """Wait until attempt `attempt` has trained `steps` steps past the step it resumed from;
        returns the step the operator last read."""

        def probe() -> int | None:
            seen = training_attempt(self.view, job)
            if seen is None or seen[0] != attempt:
                return None
            resumed = int(
                (self.view.status(job).get("checkpoints") or {}).get("resumedFromStep") or 0
            )
            return seen[1] if seen[1] >= resumed + steps else None

        return self.view.wait(f"{job} attempt {attempt} to train {steps} steps", probe, job=job)

    def last_resume(self, job: str) -> str | None:
        """When the operator last recorded the gang resuming (rank 0's report)."""
        return (self.view.status(job).get("checkpoints") or {}).get("lastResumeTime")

    def wait_restarted(
        self, job: str, attempt: int, fault: str, t_fault: float, step: int, resumed: str | None
    ) -> Obj:
        """Wait for the gang to train again in attempt `attempt` (the same one for a restart in
        place), resumed after `resumed` (lastResumeTime before the fault); record the restart:
        fault -> the operator's report of it, and fault -> rank 0's own resume time."""
        t_wall = time.time() - (time.monotonic() - t_fault)

        def probe() -> Obj | None:
            seen = training_attempt(self.view, job)
            if seen is None or seen[0] != attempt or self.last_resume(job) == resumed:
                return None
            ckpt = self.view.status(job).get("checkpoints") or {}
            return {
                "resumedFromStep": ckpt.get("resumedFromStep"),
                "stepsLost": ckpt.get("stepsLost"),
                "lastResumeTime": ckpt.get("lastResumeTime"),
            }

        got = self.view.wait(f"{job} attempt {attempt} training after {fault}", probe, job=job)
        seconds = round(time.monotonic() - t_fault, 1)
        entry = {"job": job, "fault": fault, "attempt": attempt, "stepAtFault": step, **got}
        entry["seconds"] = seconds
        # Where the time went: the operator seeing the failure (it records the restart: one more
        # disruption, or the next attempt), the new pods running (their containers started),
        # the trainer resumed (reported).
        with self.view.cond:
            history = [(t, o.get("status") or {}) for t, n, o in self.view.ftj_history if n == job]
            before = next((st for t, st in reversed(history) if t < t_fault), {})
            seen = next(
                (
                    t
                    for t, st in history
                    if t >= t_fault
                    and any(st.get(k, 0) > before.get(k, 0) for k in ("disruptions", "attempts"))
                ),
                None,
            )
            starts = [
                self.view.running_at[p]
                for p, meta in self.view.pod_meta.items()
                if meta[:2] == (job, attempt) and p in self.view.running_at
            ]
            gang = [
                p
                for p, meta in self.view.pod_meta.items()
                if meta[:2] == (job, attempt)
                and p in self.view.running_at
                and p in self.view.pods  # not deleted
                and not self.view.pods[p]["metadata"].get("deletionTimestamp")
            ]
            fresh = [p for p in gang if self.view.running_at[p] >= t_fault]
        entry["failureSeenAfter"] = round(seen - t_fault, 1) if seen else None
        # The restart as rank 0 timed it (its resume, to the second), without the operator's
        # progress interval: the figure to compare with the 30 s target.
        at = got.get("lastResumeTime")
        if at:
            resumed_at = epoch(at)
            entry["trainerResumedAfter"] = round(resumed_at - t_wall, 1)
        entry["podsRunningAfter"] = round(max(starts) - t_fault, 1) if starts else None
        # Between the pods running and the resume: the new pods' import of the trainer, then
        # the gang forming (every rank, the pods that stayed too), then loading and restoring.
        entry["importedAfter"] = self.view.logged_after(fresh, IMPORTED, t_wall)
        entry["gangFormedAfter"] = self.view.logged_after(gang, FORMED, t_wall)
        self.restarts.append(entry)
        self.timing.record(f"faults_restart_{job}_attempt{attempt}_{fault}", seconds)
        print(f"[faults] {job}: {fault} at step {step} -> attempt {attempt} training {entry}")
        return entry

    def wait_finished(self, job: str) -> Obj:
        return self.view.wait(
            f"{job} to finish",
            lambda: (
                self.view.ftjs.get(job) if self.view.status(job).get("phase") in FINISHED else None
            ),
        )

    def rank_pod(self, job: str, attempt: int, rank: int) -> Obj:
        def probe() -> Obj | None:
            pods = [p for p in self.view.job_pods(job, attempt) if pod_index(p) == rank]
            running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            return running[0] if running else None

        return self.view.wait(f"{job} attempt {attempt} rank {rank} running", probe, job=job)

    def strike(self, job: str) -> float:
        """Note that a fault strikes `job`'s gang now, once no operator restart is under way for
        another job; returns the time (monotonic)."""
        with self.calm:
            self.calm.wait_for(lambda: self.restarting in (None, job), timeout=WAIT_S)
            self.struck[job] = time.time()
        return time.monotonic()

    @contextlib.contextmanager
    def operator_restart(self, job: str) -> Iterator[None]:
        """Faults on jobs other than `job` wait while this runs."""
        with self.calm:
            self.restarting = job
        try:
            yield
        finally:
            with self.calm:
                self.restarting = None
                self.calm.notify_all()

    def unsettled(self, job: str) -> bool:
        """A fault struck `job`'s gang and the gang has not resumed since."""
        resumed = self.last_resume(job)
        return self.struck.get(job, 0) > (epoch(resumed) if resumed else 0)

    def delete_pod(self, pod: Obj) -> None:
        self.strike(pod["metadata"]["labels"][JOB_LABEL])
        self.kube("-n", self.ns, "delete", "pod", pod["metadata"]["name"], "--wait=false")


# ---- scenarios -------------------------------------------------------------------------------


def operator_pods(suite: Suite) -> list[Obj]:
    rel = suite.release
    return suite.kube.json("-n", rel["namespace"], "get", "pods", "-l", rel["selector"])["items"]


def others_training(view: View, job: str) -> dict[str, str]:
    """The FineTuneJobs other than `job` that train (Running, a pod running, progress read),
    with the time of their last progress report."""
    with view.cond:
        return {
            name: (st.get("progress") or {}).get("updatedAt")
            for name, ftj in view.ftjs.items()
            if (st := ftj.get("status") or {}).get("phase") == "Running"
            and (st.get("progress") or {}).get("updatedAt")
            and name != job
            and any((p.get("status") or {}).get("phase") == "Running" for p in view.job_pods(name))
        }


def stepping(suite: Suite, job: str) -> set[str]:
    """The FineTuneJobs other than `job` that train (others_training), settled since the last
    fault that struck them, and whose step the operator reads advancing: waits for one."""
    view = suite.view

    def steps() -> dict[str, int]:
        with view.cond:
            names = [n for n in others_training(view, job) if not suite.unsettled(n)]
            return {n: int((view.status(n).get("progress") or {}).get("step") or 0) for n in names}

    first: dict[str, int] = {}  # the step each job was first seen at, eligible

    def advanced() -> set[str] | None:
        now = steps()
        for n, step in now.items():
            first.setdefault(n, step)
        # `or None`: an empty set is a value to wait(), which waits only on None or False.
        return {n for n, step in now.items() if step > first[n]} or None

    return view.wait("another job stepping", advanced)


def gang_pods(view: View, job: str) -> set[str]:
    """The job's pods that run and are not going: another set later means its gang changed."""
    with view.cond:
        return {
            p["metadata"]["name"]
            for p in view.job_pods(job)
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        }


def ended(view: View, job: str) -> bool:
    """Whether a pod of the job has ended on its own (Succeeded, or Failed without being
    deleted): its gang finished, and its status owes that end (a change of its pods that no
    fault made; a fault deletes a pod, or stops a rank of a job that is then not settled)."""
    with view.cond:
        return any(
            (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and not p["metadata"].get("deletionTimestamp")
            for p in view.job_pods(job)
        )


def restart_operator_with(suite: Suite, job: str, record: Obj) -> None:
    """Delete the operator pod and, while no operator runs, rank 1 of `job`: the Job controller
    replaces that pod and the gang rejoins it without the operator, and the new operator must
    record that restart and bring every status up to date (the wait fails after CONVERGE_S of
    its pod being ready)."""
    rel, view = suite.release, suite.view
    old = [p for p in operator_pods(suite) if is_ready(p)]
    assert len(old) == 1, [p["metadata"]["name"] for p in old]
    old_name = old[0]["metadata"]["name"]
    suite.operator_logs[old_name] = suite.kube(
        "-n", rel["namespace"], "logs", old_name, "--all-containers", "--tail=-1"
    )
    rank1 = suite.rank_pod(job, 1, 1)
    record["deletedPods"] = [rank1["metadata"]["name"]]
    with suite.operator_restart(job):  # no other job is struck until it has converged
        # Some other job must be training, for the new operator to have a status to bring up to
        # date: its step read advancing now. A gang that is between attempts, or stopped, has a
        # Running phase and pods too, but no step for the new operator to read.
        training = stepping(suite, job)
        selected_at = time.time()
        gangs = {n: gang_pods(view, n) for n in training}
        step = int((view.status(job).get("progress") or {}).get("step") or 0)
        resumed, disrupted = suite.last_resume(job), int(view.status(job).get("disruptions") or 0)
        t_fault = time.monotonic()
        suite.kube("-n", rel["namespace"], "delete", "pod", old_name, "--wait=false")
        suite.delete_pod(rank1)
        new: Obj | None = None
        while new is None:
            assert time.monotonic() - t_fault < WAIT_S, "no new operator pod became ready"
            time.sleep(0.5)
            new = next(
                (
                    p
                    for p in operator_pods(suite)
                    if p["metadata"]["name"] != old_name and is_ready(p)
                ),
                None,
            )
        t_ready = time.monotonic()
        record["operatorPod"] = new["metadata"]["name"]
        record["deleteToReadySeconds"] = round(t_ready - t_fault, 1)
        suite.timing.record("faults_operator_delete_to_ready", t_ready - t_fault)
        # Everything that trained at the fault must show a status written after the new
        # operator was ready: its progress read again (or its end recorded). No other scenario
        # strikes meanwhile (Suite.restarting), but a gang struck just before the selection may
        # still change its pods and report no progress until it has re-formed, whatever the
        # operator does: it is not waited for. A gang that finished meanwhile is waited for: its
        # end is the status to write (CI runs selected only the short ft-push503 or ft-push403,
        # whose pod ended while no operator ran, and so had none to check).
        ready_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
        times: dict[str, float] = {}
        refreshed: list[str] = []

        def converged() -> Obj | None:
            now = round(time.monotonic() - t_ready, 1)
            for n in set(training) - set(times):
                st = view.status(n)
                if st.get("phase") in ("Succeeded", "Failed") or (
                    ((st.get("progress") or {}).get("updatedAt") or "") >= ready_at
                ):
                    times[n] = now
                    refreshed.append(n)
                elif suite.struck.get(n, 0) > selected_at or (
                    gang_pods(view, n) != gangs[n] and not ended(view, n)
                ):
                    times[n] = now  # struck: it reports no step until it has re-formed
            if len(times) < len(training):
                return None
            return {
                "restartedGang": job,
                "refreshed": sorted(refreshed),
                "struckMeanwhile": sorted(set(training) - set(refreshed)),
                "secondsByJob": dict(times),
            }

        got = view.wait(
            "status to converge after the operator restart", converged, timeout=CONVERGE_S
        )
        seconds = time.monotonic() - t_ready
        record.update(got, convergeSeconds=round(seconds, 1))
    # The gang that restarted while no operator ran is recorded once it trains again: the pod
    # that left is gone, so only rank 0's report of the re-formed gang tells the new operator.
    view.wait(
        f"{job}'s restart recorded by the new operator",
        lambda: int(view.status(job).get("disruptions") or 0) > disrupted,
    )
    record["restartRecordedAfterReady"] = round(time.monotonic() - t_ready, 1)
    # The new operator found every child in place: one of each per FineTuneJob, no second Job.
    items = suite.kube.json("-n", suite.ns, "get", "jobs,services,configmaps", "-l", JOB_LABEL)
    kinds: dict[str, list[str]] = {}
    for o in items["items"]:
        kinds.setdefault(o["metadata"]["labels"][JOB_LABEL], []).append(o["kind"])
    record["childrenAfterRestart"] = {k: sorted(v) for k, v in sorted(kinds.items())}
    suite.timing.record("faults_operator_ready_to_converged", seconds)
    print(f"[faults] operator restart: {record}")
    record["restart"] = suite.wait_restarted(
        job, 1, "operator+rank1-delete", t_fault, step, resumed
    )


def suspend_and_resume(suite: Suite, job: str, attempt: int, record: Obj) -> None:
    """runPolicy.suspend true while attempt `attempt` trains, false once its pods are gone: the
    gang saves at SIGTERM, and the pods that come back resume from that checkpoint."""
    view = suite.view
    step = suite.wait_trained(job, attempt)
    resumed_before = (view.status(job).get("checkpoints") or {}).get("resumedFromStep")
    t_fault = time.monotonic()
    suite.kube(
        "-n", suite.ns, "patch", "finetunejob", job, "--type=merge",
        "-p", '{"spec": {"runPolicy": {"suspend": true}}}',
    )  # fmt: skip
    view.wait(
        f"{job} Suspended with no pods left",
        lambda: view.status(job).get("phase") == "Suspended"
        and not [p for p in view.job_pods(job) if not p["metadata"].get("deletionTimestamp")
                 and (p.get("status") or {}).get("phase") in ("Pending", "Running")],
        job=job,
    )  # fmt: skip
    record["suspendedAfterSeconds"] = round(time.monotonic() - t_fault, 1)
    record["stepAtSuspend"] = step
    record["lastStepBeforeResume"] = (view.status(job).get("progress") or {}).get("step")
    record["attemptsWhileSuspended"] = view.status(job).get("attempts")
    suite.kube(
        "-n", suite.ns, "patch", "finetunejob", job, "--type=merge",
        "-p", '{"spec": {"runPolicy": {"suspend": false}}}',
    )  # fmt: skip
    t_resume = time.monotonic()
    stale_at = (view.status(job).get("progress") or {}).get("updatedAt")

    def training_again() -> tuple[int, int] | None:
        # The resume may unsuspend the same attempt's Job or start the next attempt; either way
        # new pods run and the operator reads a fresh step from them.
        seen = training_attempt(view, job)
        st = view.status(job)
        fresh = (st.get("progress") or {}).get("updatedAt") != stale_at
        running = [
            p
            for p in view.job_pods(job, seen[0] if seen else None)
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ]
        return seen if seen and fresh and running and st.get("phase") == "Running" else None

    seen = view.wait(f"{job} training again after the resume", training_again, job=job)
    # The operator records the new pods' resume step with the scrape that saw them train (or
    # fails to: the test reports it).
    with contextlib.suppress(AssertionError):
        view.wait(
            f"{job}'s status to record the resume step",
            lambda: (
                (view.status(job).get("checkpoints") or {}).get("resumedFromStep") != resumed_before
            ),
            timeout=30,
        )
    resumed_log = view.wait(
        f"{job} attempt {seen[0]} rank 0 logging its resume step",
        lambda: view.resumed_in_log(job, seen[0]) if seen[0] > 0 else None,
        timeout=60,
    )
    record["resume"] = {
        "attempt": seen[0],
        "seconds": round(time.monotonic() - t_resume, 1),
        "statusResumedFromStep": (view.status(job).get("checkpoints") or {}).get("resumedFromStep"),
        "logResumedFromStep": resumed_log,
    }
    suite.timing.record(f"faults_resume_{job}", record["resume"]["seconds"])
    print(f"[faults] {job}: suspend/resume {record}")


def chain_scenario(suite: Suite, record: Obj) -> None:
    """Operator + rank 1 deleted; then rank 0 deleted."""
    job = CHAIN
    operator = suite.outcome("operator")
    try:
        suite.wait_trained(job, 1)
        restart_operator_with(suite, job, operator.record)
    except BaseException:
        operator.finish(traceback.format_exc())
        raise
    operator.finish()
    record["restarts"] = [operator.record["restart"]]
    record["deletedPods"] = operator.record["deletedPods"]

    # The same attempt trains on: only rank 1's pod was replaced.
    step = suite.wait_trained(job, 1)
    rank0, resumed = suite.rank_pod(job, 1, 0), suite.last_resume(job)
    record["deletedPods"].append(rank0["metadata"]["name"])
    t_fault = time.monotonic()
    suite.delete_pod(rank0)
    # A second stop in one attempt: the Job controller would wait twice as long to replace
    # the pod, so the gang restarts as attempt 2.
    record["restarts"].append(suite.wait_restarted(job, 2, "rank0-delete", t_fault, step, resumed))

    record["final"] = suite.wait_finished(job)


def drain_scenario(suite: Suite, record: Obj) -> None:
    view, job = suite.view, DRAIN
    step = suite.wait_trained(job, 1)
    on_worker = view.wait(
        f"{job}'s pod on {suite.worker}",
        lambda: next(
            (p for p in view.job_pods(job, 1) if p["spec"].get("nodeName") == suite.worker), None
        ),
    )
    record["evicted"] = {"pod": on_worker["metadata"]["name"], "rank": pod_index(on_worker)}
    resumed = suite.last_resume(job)
    t_fault = suite.strike(job)
    try:
        out = suite.kube(
            "drain", suite.worker, "--pod-selector", f"{JOB_LABEL}={job}", "--ignore-daemonsets",
            "--delete-emptydir-data", "--timeout=300s", timeout=360,
        )  # fmt: skip
        record["drainSeconds"] = round(time.monotonic() - t_fault, 1)
        record["drainOutput"] = out.strip().splitlines()[-3:]
    finally:
        suite.kube("uncordon", suite.worker)
    record["restart"] = suite.wait_restarted(job, 1, "drain", t_fault, step, resumed)
    suspend_and_resume(suite, job, 1, record)
    record["final"] = suite.wait_finished(job)


def hang_scenario(suite: Suite, record: Obj) -> None:
    view, job = suite.view, HANG
    # Past a periodic checkpoint, so that the restart has one to resume from (no SIGTERM
    # checkpoint here: the stopped rank cannot take part in one).
    step = suite.wait_trained(job, 1, CKPT_EVERY + 2)
    rank1, resumed = suite.rank_pod(job, 1, 1), suite.last_resume(job)
    grace = rank1["spec"].get("terminationGracePeriodSeconds")
    assert grace == HANG_GRACE_S, f"{job}'s pods got terminationGracePeriodSeconds {grace}"
    t_fault = suite.strike(job)
    out = suite.kube(
        "-n", suite.ns, "exec", rank1["metadata"]["name"], "-c", "trainer", "--",
        "python", "-c", SIGSTOP_RANKS, timeout=60,
    )  # fmt: skip
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped, f"no trainer rank process found to stop in {rank1['metadata']['name']}"
    record["stoppedPids"] = stopped
    result = view.wait(f"{job} attempt 1 rank 0's result", lambda: view.results.get((job, 1, 0)))
    record["detectSeconds"] = round(time.monotonic() - t_fault, 1)
    record["attempt1Result"] = result
    record["restart"] = suite.wait_restarted(job, 2, "sigstop", t_fault, step, resumed)
    name = rank1["metadata"]["name"]
    record["stoppedPodExit"] = view.wait(f"{name}'s exit", lambda: view.exits.get(name))[0]
    record["final"] = suite.wait_finished(job)


def push_scenario(job: str) -> Callable[[Suite, Obj], None]:
    def scenario(suite: Suite, record: Obj) -> None:
        record["final"] = suite.wait_finished(job)

    return scenario


def refused_push_scenario(suite: Suite, record: Obj) -> None:
    """ft-push403 fails on the Hub's one 403, keeping its claim (claimRetentionPolicy); made
    again with `finetune retry`, as a user would once the token is fixed, it adopts the claim
    and pushes the result kept there without training."""
    record["first"] = suite.wait_finished(P403)
    record["main_after_refusal"] = main_commits(suite, P403)
    record["claim"] = claim_of(suite, f"{P403}-checkpoints")
    retry = subprocess.run(
        finetune_cli(suite.kube, suite.ns, "retry", P403),
        env=suite.kube.env(),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    record["retry"] = {"code": retry.returncode, "out": retry.stdout, "err": retry.stderr}
    record["final"] = wait_made_again(suite, P403, record["first"])
    record["adopted"] = claim_of(suite, f"{P403}-checkpoints")


def claim_of(suite: Suite, name: str) -> Obj | None:
    got = suite.kube("-n", suite.ns, "get", "pvc", name, "--ignore-not-found", "-o", "json")
    return json.loads(got) if got.strip() else None


def wait_made_again(suite: Suite, name: str, first: Obj) -> Obj:
    """The FineTuneJob `name` made again after `first`, once it has finished."""
    uid = first["metadata"]["uid"]

    def again() -> Obj | None:
        ftj = suite.view.ftjs.get(name)
        made_again = ftj is not None and ftj["metadata"]["uid"] != uid
        finished = made_again and (ftj.get("status") or {}).get("phase") in FINISHED
        return ftj if finished else None

    return suite.view.wait(f"{name} made again to finish", again)


def ref_scenario(suite: Suite, record: Obj) -> None:
    record["final"] = suite.wait_finished(REF)


@dataclass
class SmallClaim:
    """A claim of yours on a volume that fills up: a local PersistentVolume on a tmpfs that a kind
    node's container mounts (its writes fail with the kernel's ENOSPC, as a full disk's do), bound
    to the claim by name."""

    kube: Any
    ns: str
    name: str
    node: str

    @property
    def volume(self) -> str:
        """The PersistentVolume's name, and its folder's under /mnt on the node."""
        return f"{self.ns}-{self.name}"

    @property
    def path(self) -> str:
        return f"/mnt/{self.volume}"

    def create(self, size: int) -> None:
        mount = f"mount -t tmpfs -o size={size},mode=0777 tmpfs {self.path}"
        run([DOCKER, "exec", self.node, "sh", "-c", f"mkdir -p {self.path} && {mount}"], 60)
        on_node = {"key": "kubernetes.io/hostname", "operator": "In", "values": [self.node]}
        terms = [{"matchExpressions": [on_node]}]
        self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": self.volume},
                "spec": {
                    "capacity": {"storage": str(size)},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "claimRef": {"namespace": self.ns, "name": self.name},
                    "local": {"path": self.path},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": terms}},
                },
            }
        )
        self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": self.name},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": self.volume,
                    "resources": {"requests": {"storage": str(size)}},
                },
            },
            self.ns,
        )

    def resize(self, size: int) -> None:
        """Larger, as `kubectl edit pvc` expands a claim where its StorageClass allows it: the
        files on it stay."""
        run([DOCKER, "exec", self.node, "mount", "-o", f"remount,size={size}", self.path], 60)

    def remove(self) -> None:
        self.kube("delete", "pv", self.volume, "--wait=false", check=False)
        script = f"umount -l {self.path}; rmdir {self.path}"
        run([DOCKER, "exec", self.node, "sh", "-c", script], 60, check=False)


def full_store_scenario(job: Obj, claim: SmallClaim) -> Callable[[Suite, Obj], None]:
    def scenario(suite: Suite, record: Obj) -> None:
        first = record["first"] = suite.wait_finished(FULL)
        claim.resize(LARGER_ROOM + claim_used(suite))
        suite.kube("-n", suite.ns, "delete", "finetunejob", FULL, "--wait=true", timeout=WAIT_S)
        suite.kube.apply(job, suite.ns)
        record["final"] = wait_made_again(suite, FULL, first)

    return scenario


def claim_used(suite: Suite) -> int:
    """What the model and the data that ft-full fetches take (their files in the double)."""
    used = 0
    for kind, repo in (("models", "org/tiny"), ("datasets", "org/tiny-data")):
        got = suite.hub.fetch(f"{suite.hub.endpoint}/api/{kind}/{repo}", auth=True)
        assert got["status"] == 200, got
        used += int(json.loads(got["body"])["usedStorage"])
    return used


# ---- jobs ------------------------------------------------------------------------------------


def fault_job(ns: str, endpoint: str, name: str, nodes: int = 2, **run_policy: Any) -> Obj:
    job = example_job(ns, endpoint, name)
    spec = job["spec"]
    spec["training"]["checkpointEverySteps"] = CKPT_EVERY
    spec["runPolicy"] = {"backoffLimit": 4, **run_policy}
    if nodes == 1:
        spec["resources"]["nodes"] = 1
        spec["training"]["maxSteps"] = PUSH_STEPS
        del spec["template"]["affinity"]
    return job


def reference_for(job: Obj) -> float | None:
    return test_e2e.REFERENCE.get(training_key(job))


# ---- the module's one setup ------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(
    kube: Any, images: dict[str, str], operator_release: dict[str, str], timing: Any
) -> Iterator[Suite]:
    t0 = time.monotonic()
    ns = kube.create_namespace("faults")
    token = f"e2etok{secrets.token_hex(20)}"
    # Every trainer pod's whole log, kept from the last run (a few MB): where a restart's
    # seconds went is in their timestamps.
    logs = conftest.RESULTS / "kind-faults-pod-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    view = View(kube, ns, logs)
    worker = worker_node(kube)
    s: Suite | None = None
    # `docker exec` reaches kind's own nodes only.
    full = None if conftest.CONTEXT else SmallClaim(kube, ns, FULL, control_plane_node(kube))
    try:
        hub = setup_hub(kube, ns, token, timing, images)
        s = Suite(kube, ns, hub, token, operator_release, timing, view, worker)
        assert s.hub_faults("DELETE") == {"pending": [], "fired": {}}
        for job, status, count in ((P503, 503, PUSH503_COUNT), (P403, 403, 1)):
            s.hub_faults(
                "POST", {"kind": "commit", "status": status, "count": count, "repo": f"org/{job}"}
            )
        jobs = {
            CHAIN: fault_job(ns, hub.endpoint, CHAIN),
            DRAIN: fault_job(ns, hub.endpoint, DRAIN),
            HANG: fault_job(ns, hub.endpoint, HANG, hangTimeoutSeconds=HANG_TIMEOUT_S),
            P503: fault_job(ns, hub.endpoint, P503, nodes=1),
            P403: fault_job(ns, hub.endpoint, P403, nodes=1),
        }
        if full is not None:
            full.create(FULL_ROOM + claim_used(s))
            jobs[FULL] = fault_job(ns, hub.endpoint, FULL, nodes=1)
            claim = {"persistentVolumeClaim": {"claimName": FULL}}
            jobs[FULL]["spec"]["output"]["checkpoints"] = claim
        # Its gate cannot be met: the run ends EvaluationGateFailed, and nothing is pushed.
        jobs[HANG]["spec"]["evaluation"]["gates"] = {"perplexity": 1.0}
        jobs[HANG]["spec"]["template"]["terminationGracePeriodSeconds"] = HANG_GRACE_S
        s.reference = reference_for(jobs[CHAIN])
        s.reference_source = "test_e2e (same session)"
        if s.reference is None:
            jobs[REF] = fault_job(ns, hub.endpoint, REF)
            s.reference_source = REF
        view.start()
        kube.apply(list(jobs.values()), ns)
        s.run("chain", chain_scenario)
        s.run("drain", drain_scenario)
        s.run("hang", hang_scenario)
        s.run("push503", push_scenario(P503))
        s.run("push403", refused_push_scenario)
        if full is not None:
            s.run("full", full_store_scenario(jobs[FULL], full))
        if REF in jobs:
            s.run("ref", ref_scenario)
        timing.record("faults_setup", time.monotonic() - t0)
        yield s
    finally:
        view.stop()
        if s is None or s.failed:
            out = (
                conftest.RESULTS
                / "kind-logs"
                / f"faults-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            )
            conftest.collect_diagnostics(kube, ns, out)
            shutil.copytree(logs, out / "followed-pod-logs", dirs_exist_ok=True)
            for name, text in (s.operator_logs if s else {}).items():
                (out / f"operator-{name}.log").write_text(text)
            print(f"\ndiagnostics: {out}")
        kube("uncordon", worker, check=False)
        if full is not None:
            full.remove()
        if os.environ.get("FINETUNE_E2E_KEEP") != "1":
            kube("delete", "namespace", ns, "--wait=false", check=False)
        timing.record("faults_module_total", time.monotonic() - t0)


class Checks:
    """Checks that do not depend on each other are collected, so one red run reports them all;
    `finish()` fails the test with every one that failed."""

    def __init__(self, suite: Suite) -> None:
        self.suite, self.problems, self.finished = suite, [], False

    def __call__(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def finish(self) -> None:
        self.finished = True
        if self.problems:
            self.suite.failed = True
            pytest.fail("\n".join(f"- {p}" for p in self.problems))


@pytest.fixture()
def check(suite: Suite, request: pytest.FixtureRequest) -> Iterator[Checks]:
    checks = Checks(suite)
    yield checks
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        suite.failed = True  # the module's teardown collects diagnostics once
    elif not checks.finished:
        pytest.fail("the test never called check.finish(): its checks were not enforced")


def outcome_of(suite: Suite, name: str) -> Obj:
    try:
        return suite.outcome(name).get(WAIT_S * 3)
    except BaseException:
        suite.failed = True
        raise


# ---- shared checks ---------------------------------------------------------------------------


def finished_as(check: Checks, ftj: Obj, phase: str, reason: str) -> Obj:
    st = ftj["status"]
    check(
        st.get("phase") == phase, f"{ftj['metadata']['name']}: phase {st.get('phase')}, not {phase}"
    )
    got = condition(st, phase).get("reason")
    check(
        got == reason,
        f"{ftj['metadata']['name']}: {phase} reason {got!r}, not {reason!r}: "
        f"{condition(st, phase)}",
    )
    return st


def steps_lost_within(check: Checks, st: Obj, job: str, bound: int) -> None:
    lost = (st.get("checkpoints") or {}).get("stepsLost")
    check(
        lost is not None and lost <= bound,
        f"{job}: stepsLost {lost} > {bound}: {st.get('checkpoints')}",
    )


def perplexity_matches(check: Checks, suite: Suite, st: Obj, job: str) -> None:
    after = ((st.get("evaluation") or {}).get("perplexity") or {}).get("after")
    ref = suite.reference
    if ref is None:
        ref_final = suite.outcome("ref").get(WAIT_S * 3)["final"]
        ref = suite.reference = (
            (ref_final["status"].get("evaluation") or {}).get("perplexity") or {}
        ).get("after")
    check(ref is not None, f"no reference perplexity ({suite.reference_source})")
    check(after is not None, f"{job}: no perplexity after training: {st.get('evaluation')}")
    if after is not None and ref is not None:
        delta = abs(after - ref) / ref
        suite.timing.record(
            f"faults_ppl_{job}", f"{after} vs {ref} ({suite.reference_source}); rel {delta:.2e}"
        )
        check(
            delta <= PPL_TOLERANCE,
            f"{job}: perplexity after {after} vs uninterrupted {ref}: {delta:.2%} apart",
        )


def children_unique(check: Checks, suite: Suite, job: str, attempts: int, claim: bool) -> None:
    """Exactly one Job, ConfigMap, headless and rendezvous Service (and claim, for a one-node
    gang), all named after the job; its pods all of the current attempt; no two attempts' pods
    ever alive at once."""
    kinds = "jobs,services,configmaps,persistentvolumeclaims"
    items = suite.kube.json("-n", suite.ns, "get", kinds, "-l", f"{JOB_LABEL}={job}")["items"]
    found = sorted((o["kind"], o["metadata"]["name"]) for o in items)
    want = [("ConfigMap", job), ("Job", job), ("Service", job), ("Service", f"{job}-rendezvous")]
    if claim:
        want.append(("PersistentVolumeClaim", f"{job}-checkpoints"))
    check(found == sorted(want), f"{job}: children {found}, want {sorted(want)}")
    pods = suite.kube.json("-n", suite.ns, "get", "pods", "-l", f"{JOB_LABEL}={job}")["items"]
    stale = [
        p["metadata"]["name"]
        for p in pods
        if p["metadata"]["labels"].get(ATTEMPT_LABEL) != str(attempts)
    ]
    check(not stale, f"{job}: pods of an earlier attempt than {attempts} remain: {stale}")
    overlaps = [o for o in suite.view.overlaps if o.startswith(f"{job}:")]
    check(not overlaps, f"{job}: {overlaps[:3]}")


def main_commits(suite: Suite, job: str) -> list[Obj] | None:
    """The history of org/<job>'s main branch in the double (None: no such repo)."""
    got = suite.hub.fetch(f"{suite.hub.endpoint}/api/models/org/{job}/commits/main", auth=True)
    if got["status"] == 404:
        return None
    assert got["status"] == 200, got
    return json.loads(got["body"])


def pushed_once(check: Checks, suite: Suite, st: Obj, job: str) -> None:
    result = st.get("result") or {}
    revision = result.get("revision")
    history = main_commits(suite, job) or []
    titles = [c["title"] for c in history]
    check(bool(revision), f"{job}: no revision in status.result: {result}")
    check(
        len(history) == 2 and titles[-1] == "initial commit",
        f"{job}: main holds {titles}, want one push",
    )
    check(
        bool(history) and history[0]["id"] == revision,
        f"{job}: main's head is not {revision}: {titles}",
    )


def nothing_pushed(check: Checks, suite: Suite, st: Obj, job: str) -> None:
    check(
        not (st.get("result") or {}).get("revision"),
        f"{job}: a revision in status: {st.get('result')}",
    )
    history = main_commits(suite, job)
    titles = [c["title"] for c in history or []]
    check(history is None or titles == ["initial commit"], f"{job}: main holds {titles}")


def restart_within_bound(check: Checks, restart: Obj) -> None:
    """A SIGTERM checkpoint: the next attempt resumes where the gang stopped, nothing is lost."""
    resumed = restart.get("resumedFromStep")
    check(
        resumed is not None and resumed >= restart["stepAtFault"],
        f"{restart['job']}: attempt {restart['attempt']} resumed from {resumed}, before the step "
        f"{restart['stepAtFault']} seen when the fault struck ({restart['fault']})",
    )


# ---- tests -----------------------------------------------------------------------------------


def test_operator_pod_deleted_while_jobs_train(suite: Suite, check: Checks) -> None:
    record = outcome_of(suite, "operator")
    check(
        bool(record["refreshed"]),
        f"the new operator refreshed no job's status (each one that trained was struck): {record}",
    )
    for job, kinds in record["childrenAfterRestart"].items():
        if job == P403:
            # `finetune retry` deletes it and makes it again at its own pace (refused_push_
            # scenario): caught between the two, it had its ConfigMap alone in one CI run.
            continue
        # A restarting gang may be between its Jobs (the old one deleted, the new not yet made).
        want = [["ConfigMap", "Job", "Service", "Service"], ["ConfigMap", "Service", "Service"]]
        check(kinds in want, f"{job}: children after the operator restart: {kinds}")
    check.finish()


def test_rank1_then_rank0_deleted(suite: Suite, check: Checks) -> None:
    record = outcome_of(suite, "chain")
    st = finished_as(check, record["final"], "Succeeded", "TrainingCompleted")
    for restart in record["restarts"]:
        restart_within_bound(check, restart)
    # The first stop restarts in place, the second as attempt 2: two disruptions, neither
    # spending backoffLimit.
    got = (st.get("attempts"), st.get("disruptions"))
    check(got == (2, 2), f"{CHAIN}: (attempts, disruptions) {got}, want (2, 2)")
    steps_lost_within(check, st, CHAIN, CKPT_EVERY)
    perplexity_matches(check, suite, st, CHAIN)
    pushed_once(check, suite, st, CHAIN)
    for name in record["deletedPods"]:
        code, result = suite.view.exits.get(name, (None, {}))
        check(
            code == 143 and result.get("reason") == "Interrupted",
            f"{CHAIN}: deleted pod {name} ended {code} {result}, not 143 Interrupted",
        )
    children_unique(check, suite, CHAIN, st["attempts"], claim=False)
    check.finish()


def test_drain_worker_node_then_suspend_resume(suite: Suite, check: Checks) -> None:
    record = outcome_of(suite, "drain")
    st = finished_as(check, record["final"], "Succeeded", "TrainingCompleted")
    restart_within_bound(check, record["restart"])
    resume = record["resume"]
    check(resume["attempt"] == 1, f"{DRAIN}: a suspend is no new attempt: {resume}")
    for source in ("logResumedFromStep", "statusResumedFromStep"):
        check(
            resume[source] is not None and resume[source] >= record["stepAtSuspend"],
            f"{DRAIN}: after the resume, {source} is {resume[source]}, not the SIGTERM checkpoint "
            f"at or after step {record['stepAtSuspend']}: {record}",
        )
    evicted = record["evicted"]["pod"]
    check(
        evicted in suite.view.disrupted,
        f"{DRAIN}: {evicted} was not evicted (no DisruptionTarget condition): {record}",
    )
    got = (st.get("attempts"), st.get("disruptions"))
    check(got == (1, 1), f"{DRAIN}: (attempts, disruptions) {got}, want (1, 1)")
    steps_lost_within(check, st, DRAIN, CKPT_EVERY)
    perplexity_matches(check, suite, st, DRAIN)
    pushed_once(check, suite, st, DRAIN)
    children_unique(check, suite, DRAIN, st["attempts"], claim=False)
    check.finish()


def test_sigstop_rank_collective_timeout(suite: Suite, check: Checks) -> None:
    record = outcome_of(suite, "hang")
    st = finished_as(check, record["final"], "Failed", "EvaluationGateFailed")
    result = record["attempt1Result"]
    check(result.get("reason") == "CollectiveTimeout", f"{HANG}: attempt 1 rank 0 ended {result}")
    # The limit the watchdog applied (hangTimeoutSeconds, or 3 x p99 of slow steps on a loaded
    # machine), from its message; the slack covers its 1 s poll and the pod's status reaching us.
    limit = re.search(r"\(limit (\d+)s", result.get("message", ""))
    check(limit is not None, f"{HANG}: no limit in the result's message: {result}")
    if limit is not None:
        check(
            int(limit.group(1)) >= HANG_TIMEOUT_S
            and record["detectSeconds"] <= int(limit.group(1)) + 15,
            f"{HANG}: the hang was reported {record['detectSeconds']}s after the SIGSTOP, "
            f"for a limit of {limit.group(1)}s (hangTimeoutSeconds {HANG_TIMEOUT_S})",
        )
        suite.timing.record(
            "faults_hang_detect_seconds", f"{record['detectSeconds']} (limit {limit.group(1)})"
        )
    check(
        record["stoppedPodExit"] != 137,
        f"{HANG}: the stopped rank's pod was killed (137) at the end of its grace period: the "
        "launcher did not wake its rank (SIGCONT) to act on the pod's SIGTERM",
    )
    check(st.get("attempts") == 2, f"{HANG}: {st.get('attempts')} attempts, want 2")
    steps_lost_within(check, st, HANG, CKPT_EVERY)
    perplexity_matches(check, suite, st, HANG)
    nothing_pushed(check, suite, st, HANG)
    children_unique(check, suite, HANG, st["attempts"], claim=False)
    check.finish()


def test_push_503_retried_then_pushed_once(suite: Suite, check: Checks) -> None:
    record = outcome_of(suite, "push503")
    st = finished_as(check, record["final"], "Succeeded", "TrainingCompleted")
    check(
        st.get("attempts") == 1,
        f"{P503}: {st.get('attempts')} attempts: the 503s were not retried in the pod",
    )
    fired = suite.hub_faults("GET").get("firedByRepo", {}).get(f"org/{P503}", {})
    check(fired == {"commit": PUSH503_COUNT}, f"{P503}: faults fired {fired}")
    ppl = (st.get("evaluation") or {}).get("perplexity") or {}
    check(ppl.get("after") is not None and ppl["after"] < ppl["before"], f"{P503}: {ppl}")
    pushed_once(check, suite, st, P503)
    children_unique(check, suite, P503, 1, claim=True)
    check.finish()


def test_push_403_fails_without_retraining_and_made_again_pushes_what_it_kept(
    suite: Suite, check: Checks
) -> None:
    record = outcome_of(suite, "push403")
    st = finished_as(check, record["first"], "Failed", "PushFailed")
    check(st.get("attempts") == 1, f"{P403}: {st.get('attempts')} attempts: a 403 must not retrain")
    fired = suite.hub_faults("GET").get("firedByRepo", {}).get(f"org/{P403}", {})
    check(fired == {"commit": 1}, f"{P403}: faults fired {fired}")
    check("403" in condition(st, "Failed").get("message", ""), f"{P403}: {condition(st, 'Failed')}")
    check(not (st.get("result") or {}).get("revision"), f"{P403}: pushed: {st.get('result')}")
    titles = [c["title"] for c in record["main_after_refusal"] or []]
    check(titles in ([], ["initial commit"]), f"{P403}: main held {titles} after the refusal")
    # The failed job's claim outlived it (claimRetentionPolicy.whenFailed: Retain)...
    check((st.get("checkpoints") or {}).get("claimRetained") is True, f"{P403}: {st}")
    retry = record["retry"]
    check(retry["code"] == 0 and "made again" in retry["out"], f"{P403}: finetune retry {retry}")
    kept = (record["claim"] or {}).get("metadata") or {}
    check(not kept.get("ownerReferences"), f"{P403}: the claim the failed job released: {kept}")
    uid = record["first"]["metadata"]["uid"]
    retained_from = (kept.get("labels") or {}).get("finetune.dev/retained-from")
    check(retained_from == uid, f"{P403}: claim labelled {retained_from}, not {uid}")
    adopted = (record["adopted"] or {}).get("metadata") or {}
    owners = [r["uid"] for r in adopted.get("ownerReferences") or []]
    new_uid = record["final"]["metadata"]["uid"]
    check(
        adopted.get("uid") == kept.get("uid") and owners == [new_uid],
        f"{P403}: the claim {adopted.get('uid')} owned by {owners}, not the kept "
        f"{kept.get('uid')} owned by the new {new_uid}",
    )
    # ...and the job made again adopted it and pushed what the first one kept, untrained.
    st = finished_as(check, record["final"], "Succeeded", "TrainingCompleted")
    resumed = (st.get("checkpoints") or {}).get("resumedFromStep")
    check(resumed == PUSH_STEPS, f"{P403} made again resumed from {resumed}, not {PUSH_STEPS}")
    check(st.get("attempts") == 1, f"{P403} made again: {st.get('attempts')} attempts")
    pushed_once(check, suite, st, P403)
    children_unique(check, suite, P403, 1, claim=True)
    check.finish()


def test_a_full_checkpoint_claim_fails_at_once_and_a_larger_one_trains(
    suite: Suite, check: Checks
) -> None:
    if conftest.CONTEXT:
        pytest.skip("ft-full's volume is a tmpfs that `docker exec` mounts on a kind node")
    record = outcome_of(suite, "full")
    st = finished_as(check, record["first"], "Failed", "InvalidSpec")
    message = condition(st, "Failed").get("message", "")
    check(
        message.startswith(
            "spec.output.checkpoints.size: no space left for the newest checkpoint and the next"
        ),
        f"{FULL}: {message}",
    )
    check(st.get("attempts") == 1, f"{FULL}: {st.get('attempts')} attempts: the claim is no larger")
    step = (st.get("progress") or {}).get("step")
    check(not step, f"{FULL}: trained to step {step} before it failed")
    made = record["first"]["metadata"]["creationTimestamp"]
    if st.get("completionTime"):
        refused = epoch(st["completionTime"]) - epoch(made)
        suite.timing.record("faults_full_refused_after_seconds", refused)
    st = finished_as(check, record["final"], "Succeeded", "TrainingCompleted")
    check(
        (st.get("progress") or {}).get("step") == PUSH_STEPS,
        f"{FULL} made again: {st.get('progress')}",
    )
    pushed_once(check, suite, st, FULL)
    check.finish()


def test_restart_seconds(suite: Suite, check: Checks) -> None:
    """Not a fault of its own: what the restarts above took, from the fault to training again
    (measured here) and as the operator's finetune_operator_restart_seconds saw them."""
    for name in ("chain", "drain", "hang"):
        outcome_of(suite, name)
    got = suite.hub.fetch(suite.release["metrics_url"])
    metrics = {
        line.split()[0]: float(line.split()[1])
        for line in got.get("body", "").splitlines()
        if line.startswith("finetune_operator_restart_seconds_")
    }
    count, total = (
        metrics.get("finetune_operator_restart_seconds_count"),
        metrics.get("finetune_operator_restart_seconds_sum"),
    )
    check(bool(count), f"the operator observed no restart: {metrics}")
    if count:
        suite.timing.record("faults_operator_restart_seconds_mean", total / count)
        suite.timing.record("faults_operator_restart_seconds_count", str(int(count)))
    suite.timing.record("faults_restarts", json.dumps(suite.restarts))
    print(json.dumps(suite.restarts, indent=1))
    check.finish()


def test_hub_token_in_no_log_event_or_status(suite: Suite, check: Checks) -> None:
    for name in list(suite.outcomes):
        outcome_of(suite, name)
    kube, ns = suite.kube, suite.ns
    places = {
        "FineTuneJobs": kube("-n", ns, "get", "finetunejobs", "-o", "yaml"),
        "hub log": kube("-n", ns, "logs", "deploy/hub", "--all-containers", "--tail=-1"),
        **{f"log of deleted operator pod {k}": v for k, v in suite.operator_logs.items()},
        **{f"followed log {k}": v for k, v in suite.view.log_texts().items()},
        **test_e2e.token_free_places(kube, ns, suite.release),
    }
    check(
        len(suite.view.log_texts()) >= 10,
        f"few pod logs followed: {sorted(suite.view.log_texts())}",
    )
    leaks = [where for where, text in places.items() if suite.token in text]
    check(not leaks, f"the Hub token appears in: {leaks}")
    check.finish()
