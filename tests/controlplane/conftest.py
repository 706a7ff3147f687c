"""Fixtures for tests against a real Kubernetes control plane (no kubelet).

If ``KUBECONFIG`` is set, the tests use that cluster. Otherwise the session builds
(or reuses from the cache) etcd + kube-apiserver + kube-controller-manager +
kube-scheduler + kubectl with ``hack/k8s-build.sh controlplane`` and runs them as
local processes with ``hack/controlplane.sh up`` in a fresh temporary dir, torn down
at the end of the session.

Tests talk to the API server through ``fixtures.kube.Kube`` (the ``kube`` fixture: the
``kubernetes`` client, plain dicts). The built ``kubectl`` is kept for what is about kubectl
itself, such as the columns ``kubectl get`` prints.

Without a kubelet, pods are created (e.g. by the Job controller) but stay Pending;
tests drive pod phases by patching the pod ``status`` subresource.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fixtures.kube import Kube

REPO_ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = REPO_ROOT / "hack"
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.34.4")
CACHE_DIR = Path(
    os.environ.get("FINETUNE_CACHE", str(Path.home() / ".cache" / "finetune-operator"))
)
_HERE = Path(__file__).resolve().parent

T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


def kubectl_binary() -> str:
    """The kubectl built by hack/k8s-build.sh, else the one on PATH."""
    built = CACHE_DIR / "k8s" / K8S_VERSION / "bin" / "kubectl"
    if built.is_file() and os.access(built, os.X_OK):
        return str(built)
    found = shutil.which("kubectl")
    if found:
        return found
    raise RuntimeError(f"kubectl not found at {built} or on PATH; run hack/k8s-build.sh")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.25,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}; last={last!r}")
        time.sleep(interval)


class Kubectl:
    """Runs kubectl against one cluster: ``kubectl("get", "ftj", "-n", ns)``. Only for what is
    about kubectl itself; everything else goes through the ``kube`` fixture."""

    def __init__(self, kubeconfig: str, cache_dir: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.binary = kubectl_binary()
        self.cache_dir = cache_dir

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary]
        if os.pathsep not in self.kubeconfig:
            cmd.append(f"--kubeconfig={self.kubeconfig}")
        else:  # a KUBECONFIG list: let kubectl merge it
            cmd = ["env", f"KUBECONFIG={self.kubeconfig}", *cmd]
        if self.cache_dir:
            cmd.append(f"--cache-dir={self.cache_dir}")
        cmd.extend(args)
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed (rc={proc.returncode}):\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def kubeconfig(close_after_suite: Callable[[str, Callable[[], None]], None]) -> Iterator[str]:
    """Path of an admin kubeconfig for a real control plane (see module docstring)."""
    existing = os.environ.get("KUBECONFIG")
    if existing:
        yield existing
        return

    build = subprocess.run(
        [str(HACK_DIR / "k8s-build.sh"), "controlplane"],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        raise RuntimeError(
            f"hack/k8s-build.sh controlplane failed:\n{build.stdout}\n{build.stderr[-5000:]}"
        )

    cp_dir = tempfile.mkdtemp(prefix="ft-controlplane-")
    env = dict(os.environ, CONTROLPLANE_DIR=cp_dir, CONTROLPLANE_WATCH_PID=str(os.getpid()))

    def controlplane(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HACK_DIR / "controlplane.sh"), command],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )

    up = controlplane("up")
    # Down after this process's last control-plane test; at the session's end as well, where
    # that never came (a run of one test, an interrupted one): `down` of a stopped one is a no-op.
    close_after_suite("controlplane", lambda: controlplane("down"))
    try:
        if up.returncode != 0:
            raise RuntimeError(f"hack/controlplane.sh up failed:\n{up.stdout}\n{up.stderr[-8000:]}")
        yield up.stdout.strip().splitlines()[-1]
    finally:
        controlplane("down")


@pytest.fixture(scope="session")
def kube(kubeconfig: str) -> Iterator[Kube]:
    """The API client (:class:`fixtures.kube.Kube`) bound to the session's cluster."""
    api = Kube(kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def kubectl(kubeconfig: str, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """A :class:`Kubectl` bound to the session's cluster, for tests about kubectl's output."""
    return Kubectl(kubeconfig, cache_dir=str(tmp_path_factory.mktemp("kubectl-cache")))


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """The :func:`wait_until` polling helper, for tests (conftest is not importable)."""
    return wait_until


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace ``ftj-test-<random>`` with its ``default`` ServiceAccount."""
    name = kube.create_namespace("ftj-test")
    try:
        wait_until(
            lambda: kube.get("ServiceAccount", "default", name),
            timeout=60,
            message=f"ServiceAccount {name}/default",
        )
        yield name
    finally:
        kube.delete("Namespace", name, missing_ok=True)


# --------------------------------------------------------------------------- markers


def pytest_configure(config: pytest.Config) -> None:
    # kubernetes 34.1.0 builds every ApiException with urllib3 2's deprecated getheaders().
    config.addinivalue_line(
        "filterwarnings", "ignore:HTTPResponse.getheaders:DeprecationWarning:kubernetes"
    )
    config.addinivalue_line(
        "markers",
        "controlplane: needs a real Kubernetes control plane (etcd, apiserver, "
        "controller-manager, scheduler; no kubelet); see tests/controlplane/conftest.py",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.controlplane)
