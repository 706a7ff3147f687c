"""Process helpers shared by the kind suite's conftest and test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

CACHE = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.34.4")
# Debian's CLI matches the daemon (20.10); kind's docker on PATH is newer.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
# The label (and taint) of kind's control-plane node.
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"


def epoch(rfc3339: str) -> float:
    """Seconds since the epoch of a Kubernetes timestamp ("2026-12-03T16:30:00Z")."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def is_ready(pod: dict[str, Any]) -> bool:
    """A pod that is Ready and not being deleted."""
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def run(args: list[str], timeout: float, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc.stdout


def kubectl_path() -> str:
    """The kubectl built for this Kubernetes version, else the one on PATH."""
    built = CACHE / "k8s" / K8S_VERSION / "bin" / "kubectl"
    if built.is_file():
        return str(built)
    found = shutil.which("kubectl")
    if not found:
        pytest.fail(f"kubectl not found ({built} nor PATH)")
    return found


def poll(what: str, probe: Callable[[], T | None], timeout: float = 600, every: float = 0.5) -> T:
    """`probe()` until it returns something other than None; that, or an AssertionError."""
    deadline = time.monotonic() + timeout
    while (got := probe()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return got


def worker_node(kube: Callable[..., str]) -> str:
    """The name of the cluster's one node that is not the control plane (kind's worker)."""
    names = kube("get", "nodes", "-l", f"!{CONTROL_PLANE}", "-o", "name").split()
    assert len(names) == 1, f"expected one worker node, found {names}"
    return names[0].split("/", 1)[1]


def control_plane_node(kube: Callable[..., str]) -> str:
    """The name of the cluster's control-plane node (kind has one)."""
    names = kube("get", "nodes", "-l", CONTROL_PLANE, "-o", "name").split()
    assert len(names) == 1, f"expected one control-plane node, found {names}"
    return names[0].split("/", 1)[1]
