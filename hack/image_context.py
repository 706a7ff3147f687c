#!/usr/bin/env python3
"""What each image is built from, and one hash of it, so that an image is rebuilt only when its
own sources moved: `make demo` (hack/e2e.sh) and the kind suite (tests/kind/conftest.py) both
build a target only when this hash differs from the one stamped at its last build.

    image_context.py TARGET       print TARGET's hash (operator, trainer or hub-double)

Why not just rebuild: hack/images.sh stamps the commit (VCS_REF, BUILD_DATE) into labels, so a
build after any new commit is a new image ID even from unchanged sources, and a new ID is another
kind load (the trainer image is ~7 GB). The sources are the target's part of the .dockerignore
allow-list (IMAGE_SOURCES), the Dockerfile and .dockerignore themselves, the base image's ID and,
for the trainer, the torch index its dependency layer installs from. So a Hub-double edit does
not rebuild the product images, nor the reverse, and an edit outside the build context (docs,
tests, charts) rebuilds nothing.

Env: DOCKER (default docker), BASE_IMAGE (default finetune-local/python-base:bookworm),
TORCH_INDEX_URL, as hack/images.sh reads them. Standard library only: it runs before any venv.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE_IMAGE = "finetune-local/python-base:bookworm"

# The product images install the pyproject.toml project: the build-base stage copies
# pyproject.toml and hack/docker/, and each image's app stage (operator-app, trainer-app) the
# package folders of what it runs. The Hub double installs its own distribution only. Together:
# the .dockerignore allow-list.
BUILD_BASE_SOURCES = ("pyproject.toml", "hack/docker")
IMAGE_SOURCES = {
    "operator": (*BUILD_BASE_SOURCES, "api", "operator"),
    "trainer": (*BUILD_BASE_SOURCES, "api", "trainer", "cli"),
    "hub-double": ("hub-double",),
}
# Always in the build, whatever the target.
BUILD_FILES = ("Dockerfile", ".dockerignore")


def source_files(root: Path, target: str) -> list[Path]:
    """The files `target` is built from, as .dockerignore lets them into the context."""
    files = []
    for name in (*BUILD_FILES, *IMAGE_SOURCES[target]):
        top = root / name
        if top.is_file():
            files.append(top)
        elif top.is_dir():
            files += [
                f
                for f in top.rglob("*")
                if f.is_file()
                and "__pycache__" not in f.parts
                and f.suffix not in (".pyc", ".pyo")
                and not any(part.endswith(".egg-info") for part in f.parts)
            ]
    return sorted(files)


def context_hash(root: Path, target: str, base_image_id: str, torch_index_url: str = "") -> str:
    """One hash of `target`'s sources (names and contents), the base image ID and, for the
    trainer, the torch index."""
    digest = hashlib.sha256()
    torch = torch_index_url if target == "trainer" else ""
    digest.update(f"target={target}\0base={base_image_id}\0torch={torch}\0".encode())
    for f in source_files(root, target):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def current_hash(target: str, root: Path = ROOT, docker: str = "docker") -> str:
    """context_hash with the base image and torch index that hack/images.sh would build with."""
    base = os.environ.get("BASE_IMAGE", DEFAULT_BASE_IMAGE)
    # An absent base image hashes as "": the build that creates it changes the hash again.
    base_id = subprocess.run(
        [docker, "image", "inspect", "-f", "{{.Id}}", base], capture_output=True, text=True
    ).stdout.strip()
    return context_hash(root, target, base_id, os.environ.get("TORCH_INDEX_URL", ""))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in IMAGE_SOURCES:
        print(f"usage: image_context.py {{{','.join(IMAGE_SOURCES)}}}", file=sys.stderr)
        return 2
    print(current_hash(argv[0], docker=os.environ.get("DOCKER", "docker")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
