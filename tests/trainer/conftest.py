"""Fixtures for the trainer tests: a tiny model, tokenizer and data built once per session.

Everything is offline and runs real processes: `finetune train` started with the env a pod gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import Gang

from finetune_trainer.testing.tiny import save_tiny_model, sentences


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="session")
def base_env(session_dir: Path) -> dict[str, str]:
    """Offline Hugging Face settings and one thread per rank: the machine is small and shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FINETUNE_", "RANK"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(session_dir / "hf-home"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="session")
def tiny_model_dir(session_dir: Path) -> Path:
    """A 2-layer Llama with hidden size 32 and a byte-level BPE tokenizer trained here."""
    return save_tiny_model(
        session_dir / "tiny-llama",
        sentences(500, 0),
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        layers=2,
        heads=2,
        max_positions=256,
    )


@pytest.fixture(scope="session")
def tiny_text_data(session_dir: Path) -> Path:
    out = session_dir / "text.jsonl"
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(600, 1)))
    return out


@pytest.fixture(scope="session")
def causal_manifest(tiny_model_dir: Path, tiny_text_data: Path) -> dict[str, Any]:
    """A valid FineTuneJob for the tiny model; tests copy and adjust it."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "namespace": "tests"},
        "spec": {
            "model": {"source": f"file://{tiny_model_dir}", "task": "causal-lm"},
            "dataset": {"source": f"file://{tiny_text_data}", "evalFraction": 0.1},
            "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "maxSteps": 20,
                "learningRate": 3.0e-3,
                "batchSizePerDevice": 4,
                "maxSeqLength": 32,
                "checkpointEverySteps": 10,
                "seed": 7,
            },
            "evaluation": {"metrics": ["perplexity"], "maxSamples": 40},
            "resources": {"nodes": 2, "processesPerNode": 1},
        },
    }


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

    def make(manifest: Path, nodes: int = 2, env: dict[str, str] | None = None) -> Gang:
        g = Gang(manifest, tmp_path, {**base_env, **(env or {})}, nodes)
        made.append(g)
        return g

    yield make
    for g in made:
        g.kill()
