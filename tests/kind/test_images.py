"""The images run as their pods run them: the Hub double's (Dockerfile target hub-double) holds only
the double, the operator's and the trainer's only the packages each runs, and the trainer's compiles
with torch.compile (training.compile) and preloads tcmalloc for CPU jobs.

    pytest -m kind tests/kind/test_images.py      # the `images` fixture builds it if stale

In a container like the e2e's hub container (UID 1000, read-only root, /tmp the only writable
place): finetune_hub_double imports and answers --help; torch, pip, setuptools and our product
packages are absent; every module of the double has its compiled bytecode; and the double adds
little to the runtime base it shares with the product images.
"""

from __future__ import annotations

import json
import os

import pytest
from kind_tools import DOCKER, run

pytestmark = [pytest.mark.kind]

BASE_IMAGE = os.environ.get("BASE_IMAGE", "finetune-local/python-base:bookworm")
# The double's venv is ~150 KB; the rest of the budget is the runtime stage's passwd entry and
# stdlib bytecode.
MAX_OVER_BASE_MB = 20

PROBE = r"""
import importlib.util, json, pathlib, sys, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
pkg = site / "finetune_hub_double"
print(json.dumps({
    "found": {m: importlib.util.find_spec(m) is not None for m in (
        "finetune_hub_double", "torch", "transformers", "pip", "setuptools",
        "finetune_api", "finetune_operator", "finetune_trainer", "finetune_cli")},
    "site_packages": sorted(p.name for p in site.iterdir()),
    "without_pyc": [str(p) for p in pkg.glob("*.py")
                    if not pathlib.Path(importlib.util.cache_from_source(str(p))).is_file()],
}))
"""


def docker_run(image: str, entrypoint: str, *args: str, tmp: str = "/tmp") -> str:
    return run(
        [
            DOCKER, "run", "--rm", "--read-only", "--tmpfs", tmp, "--network", "none",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--entrypoint", entrypoint, image, *args,
        ],
        timeout=120,
    )  # fmt: skip


def test_hub_double_image_holds_only_the_double(images: dict[str, str]) -> None:
    image = images["hub-double"]
    config = json.loads(run([DOCKER, "image", "inspect", image], timeout=60))[0]["Config"]
    assert config["User"] == "1000:1000", config["User"]
    assert config["Entrypoint"] == ["python", "-m", "finetune_hub_double"], config["Entrypoint"]

    probe = json.loads(docker_run(image, "python", "-c", PROBE).strip().splitlines()[-1])
    found = probe["found"]
    assert found.pop("finetune_hub_double"), probe
    assert not any(found.values()), f"the Hub-double image must not hold {found}"
    extra = [n for n in probe["site_packages"] if not n.startswith("finetune_hub_double")]
    assert not extra, f"site-packages holds more than the double: {extra}"
    assert not probe["without_pyc"], f"not compiled at build time: {probe['without_pyc']}"

    usage = docker_run(image, "python", "-m", "finetune_hub_double", "--help")
    assert "--seed-model" in usage and "--token-file" in usage, usage

    size = int(run([DOCKER, "image", "inspect", "-f", "{{.Size}}", image], timeout=60))
    base = int(run([DOCKER, "image", "inspect", "-f", "{{.Size}}", BASE_IMAGE], timeout=60))
    assert size - base < MAX_OVER_BASE_MB * 2**20, (
        f"{image} is {(size - base) / 2**20:.1f} MiB over {BASE_IMAGE}"
    )


@pytest.mark.parametrize(
    ("target", "holds"),
    [
        ("operator", {"finetune_api", "finetune_operator"}),
        # setuptools stays for inductor's C++ builds (test_trainer_image_compiles_...).
        ("trainer", {"finetune_api", "finetune_trainer", "finetune_cli", "torch", "transformers",
                     "setuptools"}),
    ],
)  # fmt: skip
def test_each_product_image_holds_the_packages_it_runs(
    images: dict[str, str], target: str, holds: set[str]
) -> None:
    # Each image installs only its own packages (the Dockerfile's operator-app and trainer-app
    # stages, the folders hack/image_context.py hashes for it): an operator-only change then
    # neither rebuilds the trainer image nor sends its ~7 GB to the kind nodes again.
    probe = json.loads(docker_run(images[target], "python", "-c", PROBE).strip().splitlines()[-1])
    assert {module for module, found in probe["found"].items() if found} == holds, probe["found"]


COMPILE_PROBE = r"""
import torch
x = torch.linspace(-2, 2, 64)
eager = (x.sin() * 2 + x.cos()).sum()
compiled = torch.compile(lambda t: (t.sin() * 2 + t.cos()).sum())(x)
torch.testing.assert_close(compiled, eager)
print("compiled", float(compiled))
"""


def test_trainer_image_compiles_as_its_pods_run_it(images: dict[str, str]) -> None:
    # inductor writes C++ for the CPU and builds it with the image's compiler against Python's
    # headers (Triton's GPU launcher needs the same two); UID 1000, the root read-only.
    # /tmp is the pod's emptyDir, which the kubelet mounts without noexec (docker's --tmpfs
    # default): the compiled kernels are loaded from there.
    out = docker_run(images["trainer"], "python", "-c", COMPILE_PROBE, tmp="/tmp:exec")
    assert "compiled" in out, out


ALLOCATOR_PROBE = r"""
import json, os, subprocess, sys
from finetune_api import parse_manifest, pod
from finetune_trainer.env import allocator_env
job = parse_manifest({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": "cpu"},
                      "spec": {"model": {"source": "hf://org/m"}, "dataset": {"source": "hf://org/d"},
                               "resources": {"accelerator": {"type": "cpu"}}}})
child = "from finetune_trainer.env import allocator_in_use; print(allocator_in_use())"
def started_with(env):
    out = subprocess.run([sys.executable, "-c", child], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return {"in_use": out.stdout.strip(), "stderr": out.stderr}
print(json.dumps({
    "operator": started_with({pod.PRELOAD_ENV: pod.CPU_ALLOCATOR}),
    "allocator_env": allocator_env(job, {}),
}))
"""


def test_trainer_image_preloads_tcmalloc_for_cpu_jobs(images: dict[str, str]) -> None:
    # A CPU pod starts with the LD_PRELOAD the operator renders (the soname, whatever the node's
    # architecture): the dynamic loader finds it in the image, silently, and the process runs
    # on it. `finetune train` started without it (launch.train_pod) finds the library too.
    got = json.loads(docker_run(images["trainer"], "python", "-c", ALLOCATOR_PROBE))
    assert got["operator"] == {"in_use": "tcmalloc", "stderr": ""}, got
    assert got["allocator_env"]["LD_PRELOAD"].endswith("/libtcmalloc_minimal.so.4"), got
