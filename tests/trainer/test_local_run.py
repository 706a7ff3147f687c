"""`finetune run`: the README demo's path, the example manifest as a 2-node local gang.

Each node is the pod's own command, `finetune train`, started by local mode with the env a pod
of that node gets (launch.run_local): it imports the trainer once and forks its ranks, and node
0 prefetches the sources as rank 0's pod does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from trainer_helpers import FINETUNE

from finetune_api.result import TrainerResult

pytestmark = pytest.mark.slow


def test_example_runs_locally_with_two_nodes(base_env: dict[str, str], tmp_path: Path) -> None:
    text = subprocess.run(
        [*FINETUNE, "example", "minilm-sentiment", "--data-dir", str(tmp_path / "data")],
        env=base_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    doc = yaml.safe_load(text)
    assert doc["spec"]["resources"]["nodes"] == 2
    # The demo's schedule, shortened: this checks the wiring, the README run shows the learning.
    doc["spec"]["training"].update(maxSteps=3, batchSizePerDevice=4, maxSeqLength=24)
    doc["spec"]["evaluation"].update(maxSamples=24, gates={})
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))

    done = subprocess.run(
        [*FINETUNE, "run", str(manifest), "--workdir", str(tmp_path / "work")],
        env=base_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["status"] == "Succeeded"
    assert result["steps"] == 3
    for metric in ("accuracy", "f1"):
        scores = result["evaluation"][metric]
        assert 0 <= scores["before"] <= 1 and 0 <= scores["after"] <= 1
    assert "[rank 1]" in done.stderr  # both nodes' logs are streamed
    assert "accuracy: " in done.stderr  # the before -> after summary
    # Rank 0's phase stamps, in the order it reached them (no output.hub: no push).
    stamps = result["phases"]
    order = [
        "process_started", "rendezvous", "data_loaded", "model_loaded", "evaluated_before",
        "first_step", "last_step", "evaluated_after", "saved", "result_written",
    ]  # fmt: skip
    assert set(stamps) == set(order)
    assert [stamps[p] for p in order] == sorted(stamps.values())
    labels = json.loads((tmp_path / "work" / "output" / "adapter_config.json").read_text())
    assert labels["task_type"] == "SEQ_CLS"
    # Rank 1 reports only its own verdict: scores, the push and the artifacts are rank 0's.
    node1 = TrainerResult.parse((tmp_path / "work" / "node-1" / "result.json").read_text())
    assert node1 is not None and (node1.rank, node1.status) == (1, "Succeeded")
    assert not node1.evaluation and node1.revision is None and node1.steps is None
    assert not node1.phases
