"""hack/image_context.py: which edits rebuild which image (for `make demo` and the kind suite).

An image is rebuilt, and the ~7 GB trainer image sent to the kind nodes again, only when the hash
of its own sources moves; these tests edit a small tree of the repository's shape and watch the
hashes, and check that the sources are exactly what .dockerignore lets into the build context.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hack_scripts import hack_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "image_context.py"
TARGETS = ("operator", "trainer", "hub-double")

image_context = hack_script("image_context.py")


def test_sources_are_the_dockerignore_allow_list() -> None:
    """A path the build context lets in but no hash covers would leave a stale image; a path the
    hash covers but the context leaves out would rebuild for nothing (README.md once did)."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    hashed = {name for names in image_context.IMAGE_SOURCES.values() for name in names}
    assert allowed == hashed
    assert "README.md" not in allowed


def test_each_product_image_installs_the_packages_its_hash_covers() -> None:
    """The Dockerfile's operator-app and trainer-app stages copy exactly the package folders that
    IMAGE_SOURCES hashes for their image: one copied but not hashed would leave that image stale
    after an edit there; one hashed but not copied would rebuild it for nothing."""
    copied: dict[str, set[str]] = {}
    stage = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            stage = line.split()[-1]
        elif line.startswith("COPY ") and "--from" not in line and stage.endswith("-app"):
            copied.setdefault(stage.removesuffix("-app"), set()).update(line.split()[1:-1])
    assert copied == {
        target: set(image_context.IMAGE_SOURCES[target]) - set(image_context.BUILD_BASE_SOURCES)
        for target in ("operator", "trainer")
    }


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name, text in {
        "Dockerfile": "FROM scratch\n",
        ".dockerignore": "*\n",
        "pyproject.toml": "[project]\n",
        "README.md": "# readme\n",
        "api/finetune_api/crd.py": "x = 1\n",
        "trainer/finetune_trainer/train.py": "y = 1\n",
        "hack/docker/install-deps.sh": "true\n",
        "hack/e2e.sh": "true\n",
        "hub-double/hub_double/app.py": "z = 1\n",
        "docs/api.md": "# api\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def hashes(root: Path, base: str = "sha256:base", torch: str = "") -> dict[str, str]:
    return {t: image_context.context_hash(root, t, base, torch) for t in TARGETS}


def moved(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {t for t in TARGETS if before[t] != after[t]}


@pytest.mark.parametrize(
    ("path", "rebuilt"),
    [
        ("README.md", set()),
        ("docs/api.md", set()),
        ("hack/e2e.sh", set()),
        ("api/finetune_api/__pycache__/crd.cpython-311.pyc", set()),
        ("api/finetune_api/crd.py", {"operator", "trainer"}),
        ("trainer/finetune_trainer/new_task.py", {"trainer"}),
        ("cli/finetune_cli/main.py", {"trainer"}),
        ("operator/finetune_operator/lifecycle.py", {"operator"}),
        ("hack/docker/install-deps.sh", {"operator", "trainer"}),
        ("pyproject.toml", {"operator", "trainer"}),
        ("hub-double/hub_double/app.py", {"hub-double"}),
        ("Dockerfile", set(TARGETS)),
    ],
)
def test_an_edit_rebuilds_only_the_images_built_from_it(
    tree: Path, path: str, rebuilt: set[str]
) -> None:
    before = hashes(tree)
    edited = tree / path
    edited.parent.mkdir(parents=True, exist_ok=True)
    edited.write_text((edited.read_text() if edited.exists() else "") + "# edit\n")
    assert moved(before, hashes(tree)) == rebuilt


def test_a_new_base_image_rebuilds_all_and_a_torch_index_the_trainer(tree: Path) -> None:
    before = hashes(tree)
    assert moved(before, hashes(tree, base="sha256:other")) == set(TARGETS)
    assert moved(before, hashes(tree, torch="https://download.pytorch.org/whl/cpu")) == {"trainer"}


def test_a_renamed_file_moves_the_hash(tree: Path) -> None:
    """Names count, not only contents: a module moved to another package is another build."""
    before = hashes(tree)
    (tree / "api/finetune_api/crd.py").rename(tree / "api/finetune_api/schema.py")
    assert moved(before, hashes(tree)) == {"operator", "trainer"}


def test_the_command_prints_the_hash_and_refuses_an_unknown_target(tree: Path) -> None:
    # A copy of the script in the small tree: its root is the tree. DOCKER=true answers the
    # base-image inspect with nothing, as when the base is not built yet.
    shutil.copy(SCRIPT, tree / "hack" / "image_context.py")
    env = {"DOCKER": "true", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, str(tree / "hack" / "image_context.py"), "trainer"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip()  # fmt: skip
    assert out == image_context.context_hash(tree, "trainer", "")
    bad = subprocess.run(
        [sys.executable, str(tree / "hack" / "image_context.py"), "docs"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert bad.returncode == 2 and "usage" in bad.stderr
