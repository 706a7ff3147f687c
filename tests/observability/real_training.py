"""A real training job of this project's trainer for the live dashboard test: two pods, each a
`finetune train JOB.yaml` process with the env the operator gives a pod, on a tiny Llama, a
byte-level BPE tokenizer and a jsonl corpus built here (as tests/trainer/conftest.py does).
"""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from finetune_trainer.testing.gang import LocalGang
from finetune_trainer.testing.tiny import save_tiny_model, sentences

FINETUNE = [sys.executable, "-m", "finetune_trainer.cli"]


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama with hidden size 32 and a byte-level BPE tokenizer trained here."""
    return save_tiny_model(
        out,
        sentences(500, 0),
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        layers=2,
        heads=2,
        max_positions=256,
    )


def manifest(
    name: str, namespace: str, model_dir: Path, data_file: Path, max_steps: int
) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": f"file://{model_dir}", "task": "causal-lm"},
            "dataset": {"source": f"file://{data_file}", "evalFraction": 0.1},
            "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 3.0e-3,
                "batchSizePerDevice": 4,
                "maxSeqLength": 32,
                "checkpointEverySteps": max(1, max_steps // 3),
                "seed": 7,
            },
            "evaluation": {"metrics": ["perplexity"], "maxSamples": 40},
            "resources": {"nodes": 2, "processesPerNode": 1},
        },
    }


def pod_env(workdir: Path) -> dict[str, str]:
    """Offline Hugging Face settings and one thread per rank: the machine is small and shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FINETUNE_", "RANK"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(workdir / "hf-home"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


class RealRun(LocalGang):
    """Two pods of one FineTuneJob, each a `finetune train` process in its own session."""

    STEP_LINE = re.compile(r"step=(\d+)/(\d+) loss=([\d.]+)")

    def __init__(self, workdir: Path, doc: dict[str, Any], nodes: int = 2) -> None:
        self.doc = doc
        manifest = workdir / "job.yaml"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        super().__init__(manifest, workdir, pod_env(workdir), nodes)

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.metrics_ports]

    def start(self, extra_env: Mapping[str, str] | None = None) -> RealRun:
        return super().start(
            {
                # As the operator renders into pods: stay up for a final scrape (1 s here)...
                "FINETUNE_METRICS_LINGER_SECONDS": "3",
                # ...and a peak to measure MFU against; a CPU has no published one, so a
                # nominal 1 TFLOP/s stands in.
                "FINETUNE_PEAK_FLOPS_PER_SECOND": "1e12",
                **(extra_env or {}),
            }
        )

    def logged_losses(self) -> list[tuple[int, float]]:
        """(step, loss) of rank 0's step lines, in order."""
        text = self.logs[0].read_text(errors="replace") if self.logs[0].exists() else ""
        return [(int(s), float(loss)) for s, _, loss in self.STEP_LINE.findall(text)]

    def scrape(self, node: int, metric: str) -> float | None:
        """The value of a (single-series) metric on a pod's exporter, None if not there."""
        try:
            url = f"http://127.0.0.1:{self.metrics_ports[node]}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        match = re.search(rf"^{re.escape(metric)}\{{[^}}]*\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else None
