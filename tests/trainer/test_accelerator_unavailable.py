"""A pod that reserved accelerators it cannot use fails at once, for good, with reason
AcceleratorUnavailable: a GPU spec on this CPU machine, and any TPU spec (no XLA runtime in this
image). Both entries are checked: `finetune train` (the pod, before any rank starts) and a rank
itself (`python -m finetune_trainer.rank`, what local mode and a re-spawned rank run)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import FINETUNE, deep_update

from finetune_api.pod import PERMANENT_EXIT_CODES

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="needs a machine without CUDA: it checks the refusal"
)

GPU = {"accelerator": {"type": "nvidia.com/gpu", "count": 1}}
TPU = {
    "accelerator": {
        "type": "google.com/tpu",
        "count": 4,
        "tpu": {"accelerator": "tpu-v5-lite-podslice", "topology": "2x2"},
    }
}
CASES = {"gpu": (GPU, "no CUDA device"), "tpu": (TPU, "no XLA runtime")}
ENTRIES = {
    "finetune-train": [*FINETUNE, "train"],
    "rank": [sys.executable, "-m", "finetune_trainer.rank"],
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case", list(CASES))
def test_unusable_accelerators_fail_at_once(
    case: str,
    entry: str,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    resources, fragment = CASES[case]
    doc = deep_update(causal_manifest, {"spec": {"resources": {"nodes": 1, **resources}}})
    result_file = tmp_path / "result.json"
    env = {
        **base_env,
        "FINETUNE_RESULT_FILE": str(result_file),
        "FINETUNE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "FINETUNE_METRICS_PORT": "0",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    done = subprocess.run(
        [*ENTRIES[entry], str(write_manifest(doc))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in PERMANENT_EXIT_CODES, done.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert (result["status"], result["reason"]) == ("Failed", "AcceleratorUnavailable")
    assert fragment in result["message"]
    # Nothing was loaded or trained: the check comes first.
    assert "trainable parameters" not in done.stderr
    assert not (tmp_path / "checkpoints").exists()
