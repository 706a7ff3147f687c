"""Helpers for the trainer tests (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

FINETUNE = [sys.executable, "-m", "finetune_trainer.cli"]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all are held open together, so none is handed out twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def deep_update(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


class Gang:
    """`finetune train` once per node, with the env the operator gives each pod."""

    def __init__(self, manifest: Path, workdir: Path, env: dict[str, str], nodes: int) -> None:
        self.manifest, self.workdir, self.env, self.nodes = manifest, workdir, env, nodes
        self.procs: list[subprocess.Popen[bytes]] = []
        self.metrics_ports: list[int] = []
        self.logs = [workdir / f"node-{i}.log" for i in range(nodes)]
        self.results = [workdir / f"node-{i}" / "result.json" for i in range(nodes)]

    def start(self, extra_env: dict[str, str] | None = None) -> Gang:
        port, *self.metrics_ports = free_ports(1 + self.nodes)
        self.procs = []
        for i in range(self.nodes):
            self.results[i].parent.mkdir(parents=True, exist_ok=True)
            env = {
                **self.env,
                "NODE_RANK": str(i),
                "NNODES": str(self.nodes),
                "NPROC_PER_NODE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "FINETUNE_RESULT_FILE": str(self.results[i]),
                "FINETUNE_CHECKPOINT_DIR": str(self.workdir / "checkpoints"),
                "FINETUNE_OUTPUT_DIR": str(self.workdir / "output"),
                "FINETUNE_METRICS_PORT": str(self.metrics_ports[i]),
                "FINETUNE_DEBUG_PARAM_HASH_FILE": str(self.workdir / "params-{rank}.sha256"),
                **(extra_env or {}),
            }
            with self.logs[i].open("ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        [*FINETUNE, "train", str(self.manifest)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        return self

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"gang did not finish in {timeout}s:\n{self.log_text()[-4000:]}")
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
