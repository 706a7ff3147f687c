"""A checkpoint store that fills up, under a real two-pod gang: the checkpoints are on a tmpfs of
a few hundred KiB, whose writes fail with the kernel's own ENOSPC, as a full claim's do.

The tiny model's checkpoint takes about 124Ki there (the trainable LoRA weights, their Adam state
and every rank's RNG state, in 4Ki pages)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import Gang, deep_update

from finetune_api import pod
from finetune_api.pod import ExitCode
from finetune_trainer import checkpoint

pytestmark = pytest.mark.slow

CHECKPOINT_SIZE = 124 * 1024


def _kept(volume: Path) -> list[int]:
    roots = [p for p in volume.iterdir() if p.is_dir()]  # the job's folder, once it saved
    assert len(roots) <= 1, roots
    return [step for root in roots for step, _ in checkpoint.list_complete(root)]


def test_a_full_store_deletes_older_checkpoints_and_training_goes_on(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    small_volume: Callable[[int], Path],
) -> None:
    volume = small_volume(int(2.5 * CHECKPOINT_SIZE))  # room for two, and checkpointsToKeep is 3
    doc = deep_update(
        causal_manifest,
        {"spec": {"training": {"maxSteps": 6, "checkpointEverySteps": 1, "checkpointsToKeep": 3}}},
    )
    g = gang(write_manifest(doc)).start({pod.CHECKPOINT_DIR_ENV: str(volume)})
    assert g.wait(timeout=180) == [0, 0], g.log_text()[-4000:]
    result = g.result(0)
    assert result["status"] == "Succeeded" and result["steps"] == 6, result
    # Steps 3 to 6 each found the store full and deleted the one before the newest.
    assert g.log_text().count("deleting 1 older checkpoint(s)") == 4, g.log_text()[-4000:]
    assert _kept(volume) == [5, 6]


def test_a_store_too_small_for_the_next_checkpoint_ends_the_job_and_keeps_the_last(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    small_volume: Callable[[int], Path],
) -> None:
    volume = small_volume(int(1.5 * CHECKPOINT_SIZE))  # room for one: the next cannot be written
    doc = deep_update(
        causal_manifest,
        {"spec": {"training": {"maxSteps": 6, "checkpointEverySteps": 2, "checkpointsToKeep": 1}}},
    )
    env = {pod.CHECKPOINT_DIR_ENV: str(volume)}
    g = gang(write_manifest(doc)).start(env)
    codes = g.wait(timeout=180)
    # At once and for good: another attempt would train to the same save and fail there again.
    assert codes[0] == ExitCode.INVALID_SPEC, g.log_text()[-4000:]
    result = g.result(0)
    assert result["status"] == "Failed" and result["reason"] == "InvalidSpec", result
    message = result["message"]
    assert message.startswith(
        "spec.output.checkpoints.size: no space left for the checkpoint of step 4 (about "
    ), message
    assert "make the checkpoint claim (output.checkpoints.size" in message
    assert message.endswith("the one of step 2 is kept"), message
    assert _kept(volume) == [2]

    # The claim made larger (`kubectl edit pvc`, where its StorageClass allows expansion): the
    # same job resumes from the kept checkpoint, so the full store cost the steps after it.
    remount = ["mount", "-o", f"remount,size={3 * CHECKPOINT_SIZE}", str(volume)]
    subprocess.run(remount, check=True)
    g.start(env)
    assert g.wait(timeout=180) == [0, 0], g.log_text()[-4000:]
    result = g.result(0)
    assert result["status"] == "Succeeded" and result["resumedFromStep"] == 2, result
    assert _kept(volume) == [6]


def test_a_store_without_room_for_two_checkpoints_fails_before_training(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    small_volume: Callable[[int], Path],
) -> None:
    volume = small_volume(64 * 1024)  # less than two of the 20Ki LoRA weights and their moments
    doc = deep_update(
        causal_manifest, {"spec": {"training": {"maxSteps": 6, "checkpointEverySteps": 2}}}
    )
    g = gang(write_manifest(doc)).start({pod.CHECKPOINT_DIR_ENV: str(volume)})
    codes = g.wait(timeout=180)
    assert codes[0] == ExitCode.INVALID_SPEC, g.log_text()[-4000:]
    result = g.result(0)
    assert result["reason"] == "InvalidSpec", result
    assert result["message"].startswith(
        "spec.output.checkpoints.size: no space left for the newest checkpoint and the next, "
    ), result
    # Refused before the evaluation and the first step, not at the second save.
    assert "before training:" not in g.log_text() and "step=" not in g.log_text()
    assert _kept(volume) == []
