"""A real training job of this project's trainer for the live dashboard test: two pods, each a
`finetune train JOB.yaml` process with the env the operator gives a pod, on the test suites'
tiny Llama and jsonl corpus (`finetune_trainer.testing.tiny`).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from finetune_trainer.testing.gang import LocalGang, offline_env


class RealRun(LocalGang):
    """Two pods of one FineTuneJob, each a `finetune train` process in its own session."""

    STEP_LINE = re.compile(r"step=(\d+)/(\d+) loss=([\d.]+)")

    def __init__(self, workdir: Path, doc: dict[str, Any], nodes: int = 2) -> None:
        self.doc = doc
        manifest = workdir / "job.yaml"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        super().__init__(manifest, workdir, offline_env(workdir / "hf-home"), nodes)

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
