"""Fixtures for the trainer tests: a tiny model, tokenizer and data built once per session.

Everything is offline and runs real processes: `finetune train` started with the env a pod gets.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import Gang

from finetune_trainer.testing.gang import offline_env
from finetune_trainer.testing.tiny import causal_job, save_test_llama, save_test_text


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="session")
def base_env(session_dir: Path) -> dict[str, str]:
    return offline_env(session_dir / "hf-home")


@pytest.fixture(scope="session")
def tiny_model_dir(session_dir: Path) -> Path:
    return save_test_llama(session_dir / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_text_data(session_dir: Path) -> Path:
    return save_test_text(session_dir / "text.jsonl")


@pytest.fixture(scope="session")
def causal_manifest(tiny_model_dir: Path, tiny_text_data: Path) -> dict[str, Any]:
    """A valid FineTuneJob for the tiny model; tests copy and adjust it."""
    return causal_job(tiny_model_dir, tiny_text_data)


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    def write(doc: dict[str, Any], name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


@pytest.fixture
def gang(tmp_path: Path, base_env: dict[str, str]) -> Iterator[Callable[..., Gang]]:
    made: list[Gang] = []

    def make(
        manifest: Path, nodes: int = 2, env: dict[str, str] | None = None, nproc_per_node: int = 1
    ) -> Gang:
        g = Gang(manifest, tmp_path, {**base_env, **(env or {})}, nodes, nproc_per_node)
        made.append(g)
        return g

    yield make
    for g in made:
        g.kill()


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A real filesystem that fills up: a tmpfs of the given bytes, whose writes fail with the
    kernel's own ENOSPC, as a full claim's do (mounting needs root, as the kind tests do)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"volume-{len(mounted)}"
        where.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(where)],
            check=True,
        )
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "--lazy", str(where)], check=True)
