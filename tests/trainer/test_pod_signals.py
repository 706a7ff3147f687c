"""A pod's SIGTERM ends it at once, whatever its launcher (`finetune train`) is doing, rather than
at the kubelet's SIGKILL a grace period later:
- while it imports the trainer, before any rank runs: a container's PID 1 ignores a signal it
  has no handler for, so the launcher handles SIGTERM from its start;
- while a rank is stopped (SIGSTOP, a debugger, the kind suite's ft-hang): the launcher follows
  the SIGTERM it forwards with SIGCONT, so the rank acts on it now.
Nor does a failed rank wait on a sibling that neither fails nor ends.

Real processes: `launch.supervise` in a child interpreter over two sleeping ranks, and a pod's
own command as PID 1 of a PID namespace of its own (`unshare`, as a container runtime runs it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_api.pod import ExitCode
from finetune_trainer.testing.gang import LocalGang

# The launcher's loop over two ranks. Each catches SIGTERM, as the trainer's loop does: a signal
# with its default action would end even a stopped process (the kernel kills at once on a fatal
# signal), a caught one waits for SIGCONT. Rank 0 sleeps; rank 1 fails after argv[2] seconds (0:
# it sleeps too). argv[1]: the launcher's failure grace.
SUPERVISOR = r"""
import subprocess, sys
from finetune_trainer import launch

launch.FAILURE_GRACE_S = float(sys.argv[1])
catch = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
sleep = catch + "time.sleep(600)"
fail = catch + f"time.sleep({sys.argv[2]}); sys.exit(1)"
ranks = [
    subprocess.Popen([sys.executable, "-c", sleep]),
    subprocess.Popen([sys.executable, "-c", fail if float(sys.argv[2]) else sleep]),
]
print(" ".join(str(p.pid) for p in ranks), flush=True)
sys.exit(launch.supervise(ranks))
"""

# Without SIGCONT the stopped rank never ends and neither does the launcher.
ENDS_WITHIN_S = 60


def start(grace_s: float, fail_after_s: float) -> tuple[subprocess.Popen[str], list[int]]:
    launcher = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(grace_s), str(fail_after_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert launcher.stdout is not None
    return launcher, [int(pid) for pid in launcher.stdout.readline().split()]


def wait_catching(pid: int, sig: int) -> None:
    """Until the process has a handler for `sig` (SigCgt in /proc/PID/status): before that, the
    signal would take its default action instead."""
    deadline = time.monotonic() + ENDS_WITHIN_S
    while time.monotonic() < deadline:
        caught = next(
            int(line.split()[1], 16)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("SigCgt:")
        )
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} never caught signal {sig}")


def ended(launcher: subprocess.Popen[str]) -> int:
    try:
        return launcher.wait(timeout=ENDS_WITHIN_S)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
        pytest.fail(f"the launcher still waits on its stopped rank after {ENDS_WITHIN_S}s")


def test_the_pods_sigterm_ends_a_stopped_rank() -> None:
    launcher, ranks = start(grace_s=15, fail_after_s=0)
    for pid in (launcher.pid, *ranks):
        wait_catching(pid, signal.SIGTERM)
    os.kill(ranks[1], signal.SIGSTOP)
    os.kill(launcher.pid, signal.SIGTERM)
    # Both ranks ended by the SIGTERM the pod got: the pod was interrupted, not failed.
    assert ended(launcher) == ExitCode.INTERRUPTED


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_a_failed_rank_ends_its_sibling(stopped: bool) -> None:
    """Rank 1 fails while rank 0 waits on (running, or stopped): rank 0 is terminated after the
    failure grace, and the pod fails retryably. Rank 0 comes first: the launcher must poll every
    rank, not stop at the first that runs."""
    launcher, ranks = start(grace_s=0.5, fail_after_s=2)
    wait_catching(ranks[0], signal.SIGTERM)
    if stopped:
        os.kill(ranks[0], signal.SIGSTOP)
    assert ended(launcher) == ExitCode.RETRYABLE


def first_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + ENDS_WITHIN_S
    while time.monotonic() < deadline:
        if pids := children.read_text().split():
            return int(pids[0])
        time.sleep(0.05)
    pytest.fail(f"process {pid} started no child")


def wait_importing_torch(pid: int) -> None:
    """Until the process has loaded libtorch: it imports the trainer, and forks no rank before
    that import is done, seconds later."""
    deadline = time.monotonic() + ENDS_WITHIN_S
    while time.monotonic() < deadline:
        if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
            return
        time.sleep(0.02)
    pytest.fail(f"process {pid} never loaded libtorch")


def test_the_pods_sigterm_ends_its_launcher_while_it_imports(
    causal_manifest: dict[str, Any], write_manifest: Callable[..., Path], tmp_path: Path,
    base_env: dict[str, str],
) -> None:  # fmt: skip
    pid1 = ["unshare", "--pid", "--fork", "--kill-child"]
    node = LocalGang(write_manifest(causal_manifest), tmp_path, base_env, nodes=1, wrapper=pid1)
    try:
        unshare = node.start().procs[0].pid
        launcher = first_child(unshare)
        wait_importing_torch(launcher)
        os.kill(launcher, signal.SIGTERM)
        # Without a handler, PID 1 drops the signal, and the pod trains to the end (exit 0).
        assert node.wait(ENDS_WITHIN_S) == [ExitCode.INTERRUPTED], node.log_text()
    finally:
        node.kill()
