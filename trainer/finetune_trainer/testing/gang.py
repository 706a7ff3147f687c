"""The pods of one FineTuneJob as local processes, for tests and benchmarks.

Each node is one `finetune train` process (the pod's command, `launch.pod_command`) in its own
session, with exactly the rendezvous env that the operator renders into a pod; a node loss is a
SIGKILL of that session.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from finetune_api import pod
from finetune_trainer.launch import FINETUNE, pod_command

__all__ = ["FINETUNE", "LocalGang", "free_ports", "offline_env"]


# Where free_ports looks: below the kernel's ephemeral range, from which it takes every port-0
# bind and the local port of every outgoing connection on the machine. A local pod binds its
# ports seconds after they were picked (it imports torch first), and a port from that range
# may by then be another process's (a port-0 server, such as another local rank's metrics) or
# the local end of a connection, and the pod's bind fails: a live-scrape run in CI lost rank
# 1's metrics series so. Above the well-known services a test may start on a fixed port (8000,
# 8080, 9090, 9400).
PORT_FLOOR = 20000
PORT_CEILING = 29000


def ephemeral_floor() -> int:
    """The lowest port of the kernel's ephemeral range."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux
        return 32768


def _bind_unused(sock: socket.socket, top: int, pick: random.Random) -> None:
    """Bind `sock` to a random free port in [PORT_FLOOR, top), or to the kernel's choice where
    that span is empty."""
    if top <= PORT_FLOOR:
        sock.bind(("127.0.0.1", 0))
        return
    while True:
        try:
            sock.bind(("127.0.0.1", pick.randrange(PORT_FLOOR, top)))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise


def free_ports(n: int) -> list[int]:
    """n distinct free ports outside the ephemeral range (PORT_FLOOR), picked at random and
    held open together, so that none is handed out twice; the kernel's choice (port 0) where
    that range leaves no room below it."""
    top = min(PORT_CEILING, ephemeral_floor())
    pick = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.socket())
            _bind_unused(socks[-1], top, pick)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def offline_env(hf_home: Path) -> dict[str, str]:
    """This process's env for local pods: the Hub offline, the caller's HF_*, FINETUNE_* and
    RANK* settings dropped, and one thread per rank (the machine is small and shared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FINETUNE_", "RANK"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(hf_home),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env[pod.THREADS_ENV] = "1"
    return env


class LocalGang:
    """`finetune train` once per node. Rank 0 alone writes checkpoints and the output, so the
    nodes share `workdir/checkpoints` and `workdir/output`; each has its own log and result."""

    def __init__(
        self,
        manifest: Path,
        workdir: Path,
        env: Mapping[str, str],
        nodes: int,
        nproc_per_node: int = 1,
        own_hf_home: bool = False,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.manifest, self.workdir, self.env, self.nodes = manifest, workdir, dict(env), nodes
        self.nproc_per_node = nproc_per_node
        # A command that runs each pod's command, as a container runtime does: `unshare --pid
        # --fork` makes it PID 1 of its own PID namespace.
        self.wrapper = list(wrapper)
        # Each node its own HF_HOME (node-i/hf), as each pod has its own /tmp emptyDir; by
        # default the nodes share the caller's, which saves the tests' time.
        self.own_hf_home = own_hf_home
        self.procs: list[subprocess.Popen[bytes]] = []
        # Known before start, so a scraper can be pointed at the pods first.
        self.master_port, *self.metrics_ports = free_ports(1 + nodes)
        self.logs = [workdir / f"node-{i}.log" for i in range(nodes)]
        self.results = [workdir / f"node-{i}" / "result.json" for i in range(nodes)]

    def start(self, extra_env: Mapping[str, str] | None = None) -> Self:
        if self.procs:  # a restarted gang: the old ports may still be in TIME_WAIT
            self.master_port, *self.metrics_ports = free_ports(1 + self.nodes)
        self.procs = [self._spawn(i, extra_env) for i in range(self.nodes)]
        return self

    def replace(self, node: int, extra_env: Mapping[str, str] | None = None) -> Self:
        """Start node `node` again with the gang's rendezvous, as the Job controller replaces a
        pod that was stopped (same index, same hostname), while the others keep running."""
        self.procs[node] = self._spawn(node, extra_env)
        return self

    def _spawn(self, i: int, extra_env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
        self.results[i].parent.mkdir(parents=True, exist_ok=True)
        env = {
            **self.env,
            **pod.rendezvous_env(
                node_rank=i,
                nnodes=self.nodes,
                nproc_per_node=self.nproc_per_node,
                master_addr="127.0.0.1",
                master_port=self.master_port,
            ),
            pod.RESULT_FILE_ENV: str(self.results[i]),
            pod.CHECKPOINT_DIR_ENV: str(self.workdir / "checkpoints"),
            pod.OUTPUT_DIR_ENV: str(self.workdir / "output"),
            # train.py serves on this port + LOCAL_RANK; the ranks of a pod of several take
            # ports of their own choosing instead (0), since the next port may be taken here.
            pod.METRICS_PORT_ENV: str(self.metrics_ports[i] if self.nproc_per_node == 1 else 0),
            **({"HF_HOME": str(self.results[i].parent / "hf")} if self.own_hf_home else {}),
            **(extra_env or {}),
        }
        with self.logs[i].open("ab") as log:
            return subprocess.Popen(
                [*self.wrapper, *pod_command(self.manifest)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def finished(self) -> bool:
        return bool(self.procs) and all(p.poll() is not None for p in self.procs)

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(
                    f"gang did not finish in {timeout}s:\n{self.log_text()[-4000:]}"
                ) from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        """SIGKILL every pod's whole process group, as a node loss would."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())

    def result(self, node: int = 0) -> dict[str, Any]:
        return json.loads(self.results[node].read_text())
