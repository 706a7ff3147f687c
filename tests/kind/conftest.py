"""Shared fixtures for the kind suite: the cluster, the images on its nodes, the chart installed.

    pytest -m kind tests/kind                 # cluster up, images built + loaded, helm install
    FINETUNE_E2E_SKIP_BUILD=1 pytest -m kind tests/kind/test_e2e.py   # reuse the local images

Session fixtures, each idempotent (a warm run takes seconds, not minutes):

- `kube`: `hack/kind/cluster.sh up` (reuses a running cluster) and a kubectl wrapper.
- `images`: the operator, trainer and Hub-double images, each built by `hack/images.sh <target>`
  only when its own sources changed since its last build (hack/image_context.py; skipped with
  FINETUNE_E2E_SKIP_BUILD=1), then `cluster.sh load` only for the nodes whose containerd lacks
  that exact image ID (the trainer image is ~6 GB: a load is minutes, a check is 0.1 s).
- `operator_release`: `helm upgrade --install` (the chart installs and upgrades the CRD) into
  finetune-system with the local images (no registry, pinned tag, IfNotPresent) and the operator
  Deployment Available. The pod template carries the operator image ID, so a rebuilt image under
  the same tag rolls the pod.

Timings land in test-results/kind-e2e-timings.json, which tests/conftest.py prints in the
terminal summary.
On a failed test, `diagnostics` exports `kind export logs` plus describe/logs of everything the
test touched into test-results/kind-logs/<test>-<time>/.

With FINETUNE_KUBE_CONTEXT set, that context is used as is: nothing is created, built or loaded
(the images named by FINETUNE_E2E_OPERATOR_IMAGE / FINETUNE_E2E_TRAINER_IMAGE /
FINETUNE_E2E_HUB_DOUBLE_IMAGE, default finetune-operator:0.1.0 / finetune-trainer:0.1.0 /
finetune-hub-double:0.1.0, must be pullable by its nodes).
Skipped only when FINETUNE_SKIP_KIND=1.

test_cluster.py keeps its own module-scoped `kubectl` fixture; the fixtures here are named
differently so the two never shadow each other.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kind_tools
import pytest
from kind_tools import kubectl_path

from hack_scripts import hack_script

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "hack" / "kind" / "cluster.sh"
IMAGES_SH = REPO / "hack" / "images.sh"
HELM_SH = REPO / "hack" / "helm.sh"
CHART = REPO / "charts" / "finetune-operator"
RESULTS = REPO / "test-results"
CACHE, K8S_VERSION = kind_tools.CACHE, kind_tools.K8S_VERSION
CLUSTER_NAME = os.environ.get("CLUSTER_NAME", "finetune")
CONTEXT = os.environ.get("FINETUNE_KUBE_CONTEXT")
DOCKER = kind_tools.DOCKER

VERSION = os.environ.get("VERSION") or re.search(
    r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M
).group(1)  # type: ignore[union-attr]
OPERATOR_IMAGE = os.environ.get("FINETUNE_E2E_OPERATOR_IMAGE", f"finetune-operator:{VERSION}")
TRAINER_IMAGE = os.environ.get("FINETUNE_E2E_TRAINER_IMAGE", f"finetune-trainer:{VERSION}")
HUB_DOUBLE_IMAGE = os.environ.get("FINETUNE_E2E_HUB_DOUBLE_IMAGE", f"finetune-hub-double:{VERSION}")
# hack/images.sh target -> image ref, in build and load order (the Hub double last: its layers
# below the few-KB venv are the runtime base's, which the other two have brought to the nodes).
IMAGE_REFS = {"operator": OPERATOR_IMAGE, "trainer": TRAINER_IMAGE, "hub-double": HUB_DOUBLE_IMAGE}
OPERATOR_NAMESPACE = "finetune-system"
RELEASE = "finetune-operator"
# The chart's fullname: the release name already contains the chart name.
OPERATOR_DEPLOYMENT = RELEASE
OPERATOR_METRICS_SERVICE = f"{RELEASE}-metrics"
TIMEOUT_S = 300
# Every namespace this suite creates carries this label (see Kube.create_namespace).
E2E_NAMESPACE_LABEL = "finetune.dev/e2e"
# Older than any run of the suite (~25 min; the CI's limit is 60): a namespace of this age with
# the label above was left by a killed run.
STALE_NAMESPACE_S = 2 * 3600


# ---- process helpers -------------------------------------------------------------------------


def run(
    args: list[str], timeout: float = TIMEOUT_S, input: str | None = None, check: bool = True
) -> str:
    return kind_tools.run(args, timeout, input, check)


def kind_path() -> str:
    built = CACHE / "kind" / os.environ.get("KIND_VERSION", "v0.33.0") / "bin" / "kind"
    return str(built) if built.is_file() else (shutil.which("kind") or "kind")


class Kube:
    """kubectl against the test cluster; `kube(...)` returns stdout and raises on failure."""

    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        self.kubeconfig = kubeconfig
        self.base = [kubectl_path()]
        if kubeconfig:
            self.base += ["--kubeconfig", kubeconfig]
        if context:
            self.base += ["--context", context]

    def __call__(
        self, *args: str, timeout: float = TIMEOUT_S, input: str | None = None, check: bool = True
    ) -> str:
        return run([*self.base, *args], timeout=timeout, input=input, check=check)

    def json(self, *args: str, timeout: float = TIMEOUT_S) -> Any:
        return json.loads(self(*args, "-o", "json", timeout=timeout))

    def apply(self, obj: dict | list, namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        docs = obj if isinstance(obj, list) else [obj]
        self("apply", *ns, "-f", "-", input="\n".join(json.dumps(d) for d in docs))

    def env(self) -> dict[str, str]:
        return {**os.environ, **({"KUBECONFIG": self.kubeconfig} if self.kubeconfig else {})}

    def create_namespace(self, prefix: str) -> str:
        """A fresh namespace, labelled as this suite's so that a later run can reap it."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self("create", "namespace", name)
        self("label", "namespace", name, f"{E2E_NAMESPACE_LABEL}=true")
        # A pod is refused until the service account controller has made `default` here, which
        # took seconds on nodes that had just started.
        self("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=120s")
        return name

    def reap_stale_namespaces(self) -> list[str]:
        """Delete this suite's namespaces left by runs that were killed before their teardown.

        Their completed pods keep the trainer image they ran on referenced in the nodes'
        containerd, ~6 GB a node for each superseded image, which a later rebuild's load needs.
        Only namespaces older than any run could be are taken, so a concurrent run keeps its own.
        """
        now = time.time()
        stale = [
            ns["metadata"]["name"]
            for ns in self.json("get", "namespaces", "-l", E2E_NAMESPACE_LABEL)["items"]
            if now - kind_tools.epoch(ns["metadata"]["creationTimestamp"]) > STALE_NAMESPACE_S
        ]
        if stale:
            self("delete", "namespace", *stale, "--wait=false", check=False)
        return stale


# ---- timings ---------------------------------------------------------------------------------

TIMINGS: dict[str, float | str] = {}


def record(name: str, value: float | str) -> None:
    TIMINGS[name] = round(value, 1) if isinstance(value, float) else value


class Stopwatch:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Stopwatch:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        record(self.name, self.seconds)


class Timings:
    """The `timing` fixture: `timing.record(name, seconds)`, `with timing.stopwatch(name):`."""

    record = staticmethod(record)
    stopwatch = Stopwatch


@pytest.fixture(scope="session")
def timing() -> Timings:
    return Timings()


SESSION_T0 = time.monotonic()
TIMINGS_FILE = RESULTS / "kind-e2e-timings.json"


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Written where the tests ran (under pytest-xdist, a worker, whose terminal never shows);
    # tests/conftest.py prints it in the summary.
    if not TIMINGS:
        return
    record("pytest_session_total", time.monotonic() - SESSION_T0)
    RESULTS.mkdir(exist_ok=True)
    TIMINGS_FILE.write_text(json.dumps(TIMINGS, indent=2) + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    # Expose each phase's report on the item, so fixtures can tell a failed test at teardown.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# ---- cluster ---------------------------------------------------------------------------------


def _skip_kind() -> None:
    if os.environ.get("FINETUNE_SKIP_KIND") == "1":
        pytest.skip("FINETUNE_SKIP_KIND=1")


@pytest.fixture(scope="session")
def kube(close_after_suite: Callable[[str, Callable[[], None]], None]) -> Kube:
    _skip_kind()
    # Nodes this process starts (or creates) it stops after its last kind test; a cluster it
    # found running stays up.
    if not CONTEXT and not kind_nodes() and os.environ.get("FINETUNE_E2E_KEEP") != "1":
        close_after_suite("kind", stop_nodes)
    with Stopwatch("cluster_up"):
        run([str(CLUSTER_SH), "up"], timeout=900)
    kubeconfig = None if CONTEXT else run([str(CLUSTER_SH), "kubeconfig"]).strip()
    kube = Kube(kubeconfig, CONTEXT)
    if os.environ.get("FINETUNE_E2E_KEEP") != "1":
        record("reaped_namespaces", " ".join(kube.reap_stale_namespaces()))
    return kube


def stop_nodes() -> None:
    """`cluster.sh stop`, not waited for: systemd in each node takes seconds to shut down."""
    subprocess.Popen(
        [str(CLUSTER_SH), "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def kind_nodes() -> list[str]:
    out = run(
        [
            DOCKER,
            "ps",
            "--filter",
            f"label=io.x-k8s.kind.cluster={CLUSTER_NAME}",
            "--format",
            "{{.Names}}",
        ]
    )
    return sorted(out.split())


def local_image_id(ref: str) -> str:
    return run([DOCKER, "image", "inspect", "-f", "{{.Id}}", ref]).strip()


def _node_ref(ref: str) -> str:
    return ref if "/" in ref.split(":")[0] else f"docker.io/library/{ref}"


def node_image_id(node: str, ref: str) -> str | None:
    """The image ID containerd on a kind node has for ref (docker.io/library/ for bare names)."""
    proc = subprocess.run(
        [DOCKER, "exec", node, "crictl", "inspecti", "-o", "json", _node_ref(ref)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)["status"]["id"]
    except (ValueError, KeyError):
        return None


def ensure_loaded(ref: str) -> dict[str, Any]:
    """`cluster.sh load ref` unless every node already has the same image ID (the load then
    drops the builds the tag superseded on the nodes)."""
    want = local_image_id(ref)
    nodes = kind_nodes()
    assert nodes, f"no nodes of kind cluster {CLUSTER_NAME}"
    missing = [n for n in nodes if node_image_id(n, ref) != want]
    info: dict[str, Any] = {"image": ref, "id": want, "nodes_missing": missing, "seconds": 0.0}
    if missing:
        t0 = time.monotonic()
        run([str(CLUSTER_SH), "load", ref], timeout=3600)
        info["seconds"] = time.monotonic() - t0
        still = [n for n in nodes if node_image_id(n, ref) != want]
        assert not still, f"{ref} ({want}) still missing on {still} after kind load"
    return info


# What each image is built from, and its hash (hack/image_context.py, which `make demo` runs too).
image_context = hack_script("image_context.py")


STAMPS = CACHE / "kind-e2e" / "images"


def _stamp_path(ref: str) -> Path:
    return STAMPS / (ref.replace("/", "_").replace(":", "_") + ".json")


def image_is_current(ref: str, context: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(ref).read_text())
    except (OSError, ValueError):
        return False
    try:
        current = local_image_id(ref)
    except AssertionError:
        return False
    return stamp == {"context": context, "id": current}


def stamp_image(ref: str, context: str) -> None:
    STAMPS.mkdir(parents=True, exist_ok=True)
    _stamp_path(ref).write_text(json.dumps({"context": context, "id": local_image_id(ref)}))


# A trainer rebuild after a source change writes a new recompiled build-stage layer and a new
# ~6.2 GB venv COPY layer in the final image (the old final is pruned only after the build). The
# load then needs ~12.5 GB per node (content + unpacked snapshot), about what dropping the node's
# old version frees first.
TRAINER_BUILD_FREE_GB = 12


def check_disk_for_build(targets: list[str]) -> None:
    if "trainer" not in targets:
        return
    root = run([DOCKER, "info", "-f", "{{.DockerRootDir}}"]).strip() or "/var/lib/docker"
    free_gb = shutil.disk_usage(root).free / 2**30
    if free_gb < TRAINER_BUILD_FREE_GB:
        pytest.fail(
            f"only {free_gb:.1f} GiB free under {root}; a trainer image rebuild plus its kind load "
            f"needs ~{TRAINER_BUILD_FREE_GB} GiB. Old trainer images are dangling: `docker image "
            "prune -f --filter label=org.opencontainers.image.title=finetune-trainer` frees them "
            "(a plain `docker image prune` also drops the trainer's pip-install build cache)."
        )


@pytest.fixture(scope="session")
def images(kube: Kube) -> dict[str, str]:
    """Image refs on the cluster's nodes: {'operator': ref, 'trainer': ref, 'hub-double': ref,
    '<ref>': id}."""
    refs = dict(IMAGE_REFS)
    if CONTEXT:
        return refs
    if os.environ.get("FINETUNE_E2E_SKIP_BUILD") != "1":
        contexts = {target: image_context.current_hash(target, REPO, DOCKER) for target in refs}
        stale = [t for t, ref in refs.items() if not image_is_current(ref, contexts[t])]
        with Stopwatch("image_build_total"):
            if stale:
                check_disk_for_build(stale)
                run([str(IMAGES_SH), *stale], timeout=3600)
                for target in stale:
                    stamp_image(refs[target], contexts[target])
                    # The previous build of this image is now untagged: free its layers (~6 GB
                    # for the trainer). Only final images carry this label; build-stage caches
                    # are kept.
                    title = refs[target].rsplit(":", 1)[0].rsplit("/", 1)[-1]
                    subprocess.run(
                        [DOCKER, "image", "prune", "-f", "--filter",
                         f"label=org.opencontainers.image.title={title}"],
                        capture_output=True, timeout=600,
                    )  # fmt: skip
        record("image_build_targets", ",".join(stale) or "none (sources unchanged)")
    out = dict(refs)
    for target, ref in refs.items():
        info = ensure_loaded(ref)
        state = "cold" if info["nodes_missing"] else "warm"
        key = target.replace("-", "_")
        record(f"kind_load_{key}_{state}", info["seconds"])
        record(f"kind_load_{key}_nodes_loaded", ",".join(info["nodes_missing"]) or "none")
        out[ref] = info["id"]
    return out


@pytest.fixture
def node_image_records(kube: Kube) -> dict[str, list[tuple[str, str]]]:
    """Each node's containerd image records (k8s.io namespace) as (name, target digest)."""
    records = {}
    for node in kind_nodes():
        lines = run([DOCKER, "exec", node, "ctr", "-n", "k8s.io", "images", "ls"]).splitlines()
        records[node] = [(r[0], r[2]) for r in (line.split() for line in lines[1:]) if len(r) > 2]
    return records


def _helm(kube: Kube, *args: str, timeout: float = 600) -> str:
    """helm on the operator's release, on this suite's cluster."""
    helm = run([str(HELM_SH)], timeout=1800).strip()
    command = [helm, *args, "--namespace", OPERATOR_NAMESPACE]
    if kube.kubeconfig:
        command += ["--kubeconfig", kube.kubeconfig]
    if CONTEXT:
        command += ["--kube-context", CONTEXT]
    return run(command, timeout=timeout)


def helm_upgrade(kube: Kube, *args: str) -> None:
    """`helm upgrade` of the operator's release with `args`, waiting (5 minutes at most) for
    its pods."""
    _helm(kube, "upgrade", RELEASE, str(CHART), *args, "--wait", "--timeout", "5m")


@pytest.fixture(scope="session")
def upgrade_release(kube: Kube) -> Callable[..., None]:
    """helm_upgrade on this suite's cluster: `upgrade_release("--reuse-values", "--set", ...)`."""
    return functools.partial(helm_upgrade, kube)


@pytest.fixture(scope="session")
def release_helm(kube: Kube) -> Callable[..., str]:
    """helm on this suite's cluster, in the release's namespace: `release_helm("test", RELEASE)`;
    its output."""
    return functools.partial(_helm, kube)


@pytest.fixture
def restore_release(kube: Kube, operator_release: dict[str, str], tmp_path: Path) -> Iterator[None]:
    """The release's values as they were before the test, whatever it upgraded it to: they are
    applied with --reset-values, since --reuse-values cannot take a key out of a map (a
    nodeSelector set for the test would stay)."""
    values = tmp_path / "release-values.json"
    values.write_text(_helm(kube, "get", "values", RELEASE, "--output", "json"))
    yield
    helm_upgrade(kube, "--reset-values", "--values", str(values))


@pytest.fixture(scope="session")
def operator_release(kube: Kube, images: dict[str, str]) -> dict[str, str]:
    """The chart installed with the local images; returns the operator pod's name and more."""
    op_repo, op_tag = OPERATOR_IMAGE.rsplit(":", 1)
    tr_repo, tr_tag = TRAINER_IMAGE.rsplit(":", 1)
    image_id = images.get(OPERATOR_IMAGE, "external")
    with Stopwatch("helm_install"):
        # The chart installs and upgrades the CRD itself (crds.install, a template). A CRD left
        # by an earlier install outside this release (kubectl apply, the chart's old crds/) has
        # no helm ownership metadata: --take-ownership adopts it instead of failing.
        helm_upgrade(
            kube,
            "--install",
            "--create-namespace",
            "--take-ownership",
            # The local images carry no registry: the refs are used as they are.
            "--set-string",
            "image.registry=",
            "--set-string",
            "trainer.image.registry=",
            "--set",
            f"image.repository={op_repo}",
            "--set-string",
            f"image.tag={op_tag}",
            "--set",
            "image.pullPolicy=IfNotPresent",
            "--set",
            f"trainer.image.repository={tr_repo}",
            "--set-string",
            f"trainer.image.tag={tr_tag}",
            "--set",
            "trainer.image.pullPolicy=IfNotPresent",
            # A short progress interval, so that a job of a few dozen steps shows progress.
            "--set-json",
            'extraEnv=[{"name":"FINETUNE_PROGRESS_SECONDS","value":"2"}]',
            # A rebuilt image under the same tag must roll the operator pod.
            "--set-string",
            "podAnnotations.finetune\\.dev/image-id=" + image_id.replace(":", "-"),
        )
        kube(
            "-n",
            OPERATOR_NAMESPACE,
            "rollout",
            "status",
            f"deployment/{OPERATOR_DEPLOYMENT}",
            f"--timeout={TIMEOUT_S}s",
            timeout=TIMEOUT_S + 30,
        )
        kube(
            "-n",
            OPERATOR_NAMESPACE,
            "wait",
            "--for=condition=Available",
            f"deployment/{OPERATOR_DEPLOYMENT}",
            f"--timeout={TIMEOUT_S}s",
            timeout=TIMEOUT_S + 30,
        )
    selector = ",".join(
        f"{k}={v}"
        for k, v in kube.json("-n", OPERATOR_NAMESPACE, "get", "deployment", OPERATOR_DEPLOYMENT)[
            "spec"
        ]["selector"]["matchLabels"].items()
    )
    pods = [
        p
        for p in kube.json("-n", OPERATOR_NAMESPACE, "get", "pods", "-l", selector)["items"]
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return {
        "namespace": OPERATOR_NAMESPACE,
        "deployment": OPERATOR_DEPLOYMENT,
        "pod": pods[0]["metadata"]["name"],
        "selector": selector,
        "metrics_url": f"http://{OPERATOR_METRICS_SERVICE}.{OPERATOR_NAMESPACE}.svc:8000/metrics",
    }


@pytest.fixture()
def test_namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace; kept (not deleted) when FINETUNE_E2E_KEEP=1, for poking at."""
    name = kube.create_namespace("e2e")
    yield name
    if os.environ.get("FINETUNE_E2E_KEEP") != "1":
        kube("delete", "namespace", name, "--wait=false", check=False)


# ---- diagnostics -----------------------------------------------------------------------------


def collect_diagnostics(kube: Kube, namespace: str, out: Path) -> None:
    """Everything needed to diagnose a red run, best effort: never raises."""
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str, *args: str) -> None:
        try:
            proc = subprocess.run([*kube.base, *args], capture_output=True, text=True, timeout=120)
            (out / name).write_text(
                proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else "")
            )
        except Exception as exc:
            (out / name).write_text(f"{args}: {exc!r}\n")

    save("ftj.yaml", "-n", namespace, "get", "finetunejobs", "-o", "yaml")
    save("describe-ftj.txt", "-n", namespace, "describe", "finetunejobs")
    save("describe-jobs.txt", "-n", namespace, "describe", "jobs")
    save("describe-pods.txt", "-n", namespace, "describe", "pods")
    save("all.txt", "-n", namespace, "get", "all,configmaps,events", "-o", "wide")
    save("configmaps.yaml", "-n", namespace, "get", "configmaps", "-o", "yaml")
    save("events.txt", "get", "events", "-A", "--sort-by=.lastTimestamp")
    save("nodes.txt", "describe", "nodes")
    save("operator-describe.txt", "-n", OPERATOR_NAMESPACE, "describe", "pods")
    save(
        "operator.log",
        "-n",
        OPERATOR_NAMESPACE,
        "logs",
        f"deployment/{OPERATOR_DEPLOYMENT}",
        "--all-containers",
        "--tail=-1",
    )
    save(
        "operator-previous.log",
        "-n",
        OPERATOR_NAMESPACE,
        "logs",
        f"deployment/{OPERATOR_DEPLOYMENT}",
        "--previous",
        "--tail=-1",
    )
    try:
        pods = kube.json("-n", namespace, "get", "pods")["items"]
    except Exception:
        pods = []
    for pod in pods:
        name = pod["metadata"]["name"]
        save(
            f"pod-{name}.log",
            "-n",
            namespace,
            "logs",
            name,
            "--all-containers",
            "--prefix",
            "--tail=-1",
        )
    if not CONTEXT:
        try:
            subprocess.run(
                [kind_path(), "export", "logs", str(out / "kind"), "--name", CLUSTER_NAME],
                capture_output=True,
                timeout=300,
                env=kube.env(),
            )
        except Exception as exc:
            (out / "kind-export-error.txt").write_text(repr(exc))


@pytest.fixture()
def diagnostics(request: pytest.FixtureRequest, kube: Kube) -> Iterator[dict[str, str]]:
    """Tests put their namespace in the dict; on failure its state is collected."""
    ctx: dict[str, str] = {}
    yield ctx
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and ctx.get("namespace"):
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        out = RESULTS / "kind-logs" / f"{request.node.name}-{stamp}"
        collect_diagnostics(kube, ctx["namespace"], out)
        print(f"\ndiagnostics: {out}")
