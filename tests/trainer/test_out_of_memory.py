"""A rank whose device runs out of memory ends the job at once and for good, with reason
DeviceOutOfMemory and the fields that lower the peak.

No GPU here, so the memory that runs out is the host's: a text-to-image job at 4096 x 4096
pixels asks for gigabytes per batch, and the pod runs under an address-space limit (`prlimit
--as`), which makes the kernel refuse them as a node with strict overcommit does; the refusal
reaches the trainer as a real allocation error of torch's (or numpy's), as a full GPU's does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from trainer_helpers import Gang

from finetune_api.pod import PERMANENT_EXIT_CODES
from finetune_trainer.testing.diffusion import (
    save_shapes_dataset,
    save_tiny_pipeline,
    text_to_image_job,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit"),
]
# Room for the interpreter, torch and the loaded pipeline (about 5 GiB of address space here),
# not for a 4096 x 4096 batch (4 GiB and more per tensor).
ADDRESS_SPACE = 10 * 2**30


def test_a_batch_too_large_for_memory_fails_at_once_naming_the_fields(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    pipeline = save_tiny_pipeline(tmp_path / "pipe", vae_steps=0, unet_steps=0)
    data = save_shapes_dataset(tmp_path / "data", train=8, test=4)
    doc = text_to_image_job(pipeline, data, max_steps=2)
    doc["spec"]["training"]["resolution"] = 4096
    doc["spec"]["resources"]["nodes"] = 1
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))

    wrapper = ["prlimit", f"--as={ADDRESS_SPACE}", "--"]
    g = Gang(manifest, tmp_path / "gang", base_env, nodes=1, wrapper=wrapper).start()
    (code,) = g.wait(timeout=300)
    assert code in PERMANENT_EXIT_CODES, g.log_text()[-4000:]
    result = g.result(0)
    assert (result["status"], result["reason"]) == ("Failed", "DeviceOutOfMemory"), result
    message = result["message"]
    # The first batch is the before-training evaluation's: its activations, no gradients.
    assert message.startswith("a rank ran out of host memory while evaluating before training ("), (
        message
    )
    assert "allocate" in message  # the allocator's own account, with the size it asked for
    assert "spec.training.resolution (4096)" in message
    assert "spec.training.batchSizePerDevice (8)" in message
    assert "gradientCheckpointing" not in message
    checkpoints = g.workdir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.rglob("*")), "nothing trained"
