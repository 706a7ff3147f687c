"""Process spawning: the ranks of one pod, and the whole gang on one machine.

`train_pod` is what a pod runs (`finetune train`): it reads the rendezvous the operator gave it,
imports the trainer once (while, on rank 0's pod, `finetune_trainer.prefetch` downloads the
sources), and forks one rank per local rank (a fresh `python -m finetune_trainer.rank` where
forking is not safe); when a peer's pod is replaced, it starts them again to rejoin the gang.
`run_local` (`finetune run`) plays every pod on this machine: it runs each node as the pod's own
command with exactly the env a pod gets, and shows their progress.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn, Protocol

from finetune_api import FineTuneJob, pod
from finetune_api.pod import ExitCode
from finetune_trainer.env import (
    LOOPBACK,
    Rendezvous,
    allocator_env,
    configure_hub_env,
    free_port,
    hide_unused_packages,
    omp_threads,
)
from finetune_trainer.forked import Forked
from finetune_trainer.prefetch import Prefetch

# The `finetune` command, by its module name (the console script may not be on PATH). A command
# line, not an import: the trainer package imports no CLI.
FINETUNE = [sys.executable, "-m", "finetune_cli"]
# After one rank fails, the others are usually stuck in a collective; give them this long to
# notice on their own before they are terminated.
FAILURE_GRACE_S = 15.0
_STEP_LINE = re.compile(r"\[rank 0\].*step=(\d+)/(\d+)")


class RankProcess(Protocol):
    """What `supervise` needs of a rank process: subprocess.Popen's names."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...


def _run_rank(manifest: Path, env: Mapping[str, str]) -> int:
    """In a forked rank: its env, the default signal actions (not the launcher's forwarding),
    then what `python -m finetune_trainer.rank` runs."""
    from finetune_trainer import rank

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # As PYTHONUNBUFFERED does for a spawned rank: its lines reach the pod log as written.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    return rank.main([str(manifest)])


def preload_trainer(job: FineTuneJob) -> bool:
    """Import the trainer here, in `finetune train`, so that its ranks are forked with it loaded:
    a gang that re-forms around a replaced pod starts again without importing torch,
    transformers and peft (seconds of CPU per rank) on the pods that stayed. Returns whether
    forking is safe: a child cannot use CUDA once this process initialised it, so torch checks
    for GPUs through NVML, and if something initialised CUDA anyway the ranks are spawned."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    hide_unused_packages(job)
    import torch

    import finetune_trainer.train  # noqa: F401  (the import is the point)

    return not torch.cuda.is_initialized()


def _rank_envs(rdzv: Rendezvous, env: Mapping[str, str]) -> list[dict[str, str]]:
    """The env of each local rank of one node: `env` with its torch.distributed variables."""
    # Unbuffered, so that the ranks' lines reach the pod log (or local mode's echo) as written.
    base = {**env, "PYTHONUNBUFFERED": "1"}
    return [{**base, **rdzv.rank_env(i)} for i in range(rdzv.nproc_per_node)]


def fork_ranks(manifest: Path, rdzv: Rendezvous, env: Mapping[str, str]) -> list[Forked]:
    """`start_ranks` for a process that has imported the trainer (`preload_trainer`): each rank
    starts without importing torch, transformers and peft again."""
    return [
        Forked(functools.partial(_run_rank, manifest, rank_env))
        for rank_env in _rank_envs(rdzv, env)
    ]


def rank_command(manifest: Path) -> list[str]:
    return [sys.executable, "-m", "finetune_trainer.rank", str(manifest)]


def start_ranks(
    manifest: Path, rdzv: Rendezvous, env: Mapping[str, str]
) -> list[subprocess.Popen[bytes]]:
    """One process per local rank of one node, each with its torch.distributed variables."""
    return [
        subprocess.Popen(rank_command(manifest), env=rank_env) for rank_env in _rank_envs(rdzv, env)
    ]


def worst_exit(codes: Sequence[int]) -> int:
    """The pod's exit code from its ranks'. A permanent verdict wins (retrying cannot fix a bad
    spec or a gate), then a crash; then SIGTERM here (the pod goes), then a peer's (it rejoins)."""
    for code in (ExitCode.INVALID_SPEC, ExitCode.GATE_FAILED):
        if code in codes:
            return int(code)
    failed = {int(c) for c in codes if c != ExitCode.OK}
    if not failed:
        return int(ExitCode.OK)
    if failed <= {ExitCode.INTERRUPTED, ExitCode.REJOIN}:
        return int(ExitCode.INTERRUPTED if ExitCode.INTERRUPTED in failed else ExitCode.REJOIN)
    return int(ExitCode.RETRYABLE)


def _wake_with(proc: RankProcess, sig: int) -> None:
    """`sig`, then SIGCONT: a stopped rank (SIGSTOP, a debugger's stop) acts on the signal now,
    instead of holding it until the kubelet's SIGKILL ends the pod's grace period. systemd does
    the same when it stops a unit."""
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)


def supervise(procs: Sequence[RankProcess], terminated: threading.Event | None = None) -> int:
    """Wait for every child, forwarding SIGTERM/SIGINT (and noting them in `terminated`); a
    failed child ends its siblings."""
    terminated = terminated if terminated is not None else threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        terminated.set()
        for p in procs:
            _wake_with(p, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed_at: float | None = None
    ended_siblings = False
    try:
        # Every child is polled on each turn: `any(p.poll() is None ...)` stops at the first one
        # that runs, and would never see a rank after it fail.
        while None in (codes := [p.poll() for p in procs]):
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = time.monotonic()
            if (
                failed_at is not None
                and not ended_siblings
                and time.monotonic() - failed_at > FAILURE_GRACE_S
            ):
                for p in procs:
                    _wake_with(p, signal.SIGTERM)
                ended_siblings = True
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A rank killed by a signal reports a negative code: the pod's own SIGTERM reached it before
    # it could save (a disruption), or something else killed it (retryable).
    killed = ExitCode.INTERRUPTED if terminated.is_set() else ExitCode.RETRYABLE
    return worst_exit([p.returncode if p.returncode >= 0 else killed for p in procs])


def train_pod(manifest: Path, job: FineTuneJob) -> int:
    """`finetune train`: start this pod's local ranks and join the gang.

    When a peer's pod goes (it got SIGTERM, and the gang saved a checkpoint), the Job controller
    replaces just that pod, and this one starts its ranks again to rejoin the gang: only the
    peer's pod restarts, and no new attempt is needed."""
    preload = allocator_env(job)
    if preload:
        _start_again_with(preload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    rdzv = Rendezvous.from_env(job)
    env = dict(os.environ)
    configure_hub_env(job, env)
    env[pod.THREADS_ENV] = omp_threads(rdzv.nproc_per_node, env)
    # The Hub environment is fixed before anything from Hugging Face is imported (rank.py).
    os.environ.update(env)
    # Rank 0's download overlaps the import; the ranks start once its revisions are resolved.
    prefetch = Prefetch.start(job, rdzv.node_rank)
    try:
        fork = preload_trainer(job)
        prefetch.wait_resolved()
        return _rejoining(manifest, rdzv, fork)
    finally:
        prefetch.stop()


def _interrupted(_signum: int, _frame: FrameType | None) -> NoReturn:
    """SIGTERM or SIGINT while no rank runs (`supervise` forwards them while ranks do): while
    the trainer imports, while the prefetch resolves, between two rejoins. Nothing is there to
    save, so the pod ends now, as interrupted. Without a handler the container's PID 1 would
    ignore the kubelet's SIGTERM, and the pod would wait out its grace period for SIGKILL."""
    raise SystemExit(int(ExitCode.INTERRUPTED))


def _rejoining(manifest: Path, rdzv: Rendezvous, fork: bool) -> int:
    """This pod's ranks, started again each time a peer's pod is replaced, until they end
    otherwise (or have rejoined pod.REJOIN_LIMIT times)."""
    env = dict(os.environ)
    terminated = threading.Event()
    for rejoins in range(pod.REJOIN_LIMIT + 1):
        ranks = fork_ranks(manifest, rdzv, env) if fork else start_ranks(manifest, rdzv, env)
        code = supervise(ranks, terminated)
        if code == ExitCode.REJOIN and terminated.is_set():
            return int(ExitCode.INTERRUPTED)  # this pod is going too
        if code != ExitCode.REJOIN or rejoins == pod.REJOIN_LIMIT:
            break
        print(
            f"finetune train: a peer left the gang; starting this pod's ranks again to rejoin "
            f"it ({rejoins + 1} of at most {pod.REJOIN_LIMIT})",
            file=sys.stderr,
            flush=True,
        )
    if code == ExitCode.REJOIN:
        # The attempt fails with it, and the operator restarts the whole gang.
        print(f"finetune train: gave up after rejoining {pod.REJOIN_LIMIT} times", file=sys.stderr)
    return code


def _start_again_with(extra_env: Mapping[str, str]) -> NoReturn:
    """Run this process's own command again in its place (same pid, arguments and working
    folder) with `extra_env` added: a preloaded allocator must be there before the interpreter
    starts. The new process finds it set and goes on."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **extra_env})


def run_local(manifest: Path, job: FineTuneJob, workdir: Path | None = None) -> int:
    """`finetune run`: every pod of the gang on this machine, each the pod's own command
    (`finetune train`) with the env its pod gets."""
    res = job.spec.resources
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"finetune-{job.metadata.name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ)
    configure_hub_env(job, base)
    base.setdefault(pod.CHECKPOINT_DIR_ENV, str(workdir / "checkpoints"))
    base.setdefault(pod.OUTPUT_DIR_ENV, str(workdir / "output"))
    base.setdefault(pod.METRICS_PORT_ENV, "0")  # many ranks share this host's ports
    base[pod.THREADS_ENV] = omp_threads(res.nodes * res.processes_per_node, base)
    base.update(allocator_env(job, base))  # so that no pod starts itself again to preload it
    base.update(pod.cuda_allocator_env(res.accelerator.type, base))  # as the operator sets it
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    results = []
    for node in range(res.nodes):
        results.append(workdir / f"node-{node}" / "result.json")
        results[-1].parent.mkdir(exist_ok=True)
        env = {
            **base,
            **pod.rendezvous_env(
                node_rank=node,
                nnodes=res.nodes,
                nproc_per_node=res.processes_per_node,
                master_addr=LOOPBACK,
                master_port=port,
            ),
            pod.RESULT_FILE_ENV: str(results[-1]),
            # Unbuffered, so that the pod's lines reach the echo below as they are written.
            "PYTHONUNBUFFERED": "1",
        }
        procs.append(
            subprocess.Popen(
                pod_command(manifest), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    print(f"workdir: {workdir}", file=sys.stderr)
    finish_logs = _stream_logs(procs)
    code = supervise(procs)
    finish_logs()
    _print_summary(results[0], code)
    return code


def pod_command(manifest: Path) -> list[str]:
    """A pod's command, `finetune train MANIFEST`, as this interpreter runs it."""
    return [*FINETUNE, "train", str(manifest)]


def _stream_logs(procs: list[subprocess.Popen[bytes]]) -> Callable[[], None]:
    """Echo every node's log, with a progress bar driven by rank 0's step lines; returns the
    function that waits for the last lines once the processes have ended."""
    from tqdm import tqdm

    bars: list[tqdm] = []  # created at rank 0's first step line, when the total is known
    lock = threading.Lock()

    def pump(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            with lock:
                tqdm.write(line, file=sys.stderr)
                match = _STEP_LINE.search(line)
                if match:
                    if not bars:
                        bars.append(
                            tqdm(
                                total=int(match.group(2)),
                                unit="step",
                                file=sys.stderr,
                                disable=None,
                            )
                        )
                    bars[0].n = int(match.group(1))
                    bars[0].refresh()

    threads = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()

    def finish() -> None:
        for t in threads:
            t.join(timeout=5)
        for bar in bars:
            bar.close()

    return finish


def _print_summary(result_file: Path, code: int) -> None:
    try:
        doc = json.loads(result_file.read_text())
    except (OSError, ValueError):
        print(f"no result from rank 0 (exit code {code})", file=sys.stderr)
        return
    print(json.dumps(doc, indent=2))
    for metric, scores in (doc.get("evaluation") or {}).items():
        print(
            f"{metric}: {_fmt(scores.get('before'))} -> {_fmt(scores.get('after'))}",
            file=sys.stderr,
        )
    if doc.get("revision"):
        print(
            f"pushed {doc.get('artifact')} to {doc['repo']} at {doc['revision']}", file=sys.stderr
        )
    print(f"{doc.get('status')} ({doc.get('reason')}), exit code {code}", file=sys.stderr)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
