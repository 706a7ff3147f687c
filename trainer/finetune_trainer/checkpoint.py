"""Resumable checkpoints: written whole or not at all, found by their contents, not their names.

A checkpoint is a folder holding the trainable weights, the optimizer and scheduler state, every
rank's RNG state and the data position. It is written into a hidden temporary folder, which gets
its completion marker last and is then renamed into place, so a gang killed mid-save leaves at
worst a temporary folder that discovery ignores. The step lives in `trainer_state.json`.

Only rank 0 writes and reads checkpoints; the other ranks receive the state by broadcast (see
train.py), so the checkpoint volume need not be shared between pods. A checkpoint fetched from
elsewhere (checkpoint_mirror.py restores one from the Hub) is downloaded into a `scratch` folder
and `adopt`ed: renamed into place like a saved one, once it is known to be complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune_trainer.job_folder import COMPLETE_MARKER, TMP_PREFIX

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands; enough to continue as if it had never stopped."""

    step: int
    epoch: int
    # Micro-batches of `epoch` already consumed by every rank.
    batches_in_epoch: int
    world_size: int
    loss_history: list[float] = field(default_factory=list)
    before_scores: dict[str, float] = field(default_factory=dict)
    # The answers generated before training for the first evaluation.samples prompts.
    before_answers: list[str] = field(default_factory=list)


@dataclass
class Checkpoint:
    state: TrainerState
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole checkpoint: its marker (written last) and its state."""
    return (folder / COMPLETE_MARKER).is_file() and (folder / STATE_FILE).is_file()


def read_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / STATE_FILE).read_text()))


def list_complete(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, by the step recorded inside each."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(TMP_PREFIX) or not folder.is_dir() or not is_complete(folder):
            continue
        try:
            found.append((read_state(folder).step, folder))
        except (OSError, ValueError, TypeError):
            continue  # unreadable: treat as absent rather than fail the restart
    return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime))


def latest(root: Path) -> Path | None:
    complete = list_complete(root)
    return complete[-1][1] if complete else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write a checkpoint atomically and delete the oldest beyond `keep`."""
    tmp = scratch(root)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in ckpt.trainable.items()},
        tmp / "trainable.safetensors",
    )
    torch.save(ckpt.optimizer, tmp / "optimizer.pt")
    torch.save(ckpt.scheduler, tmp / "scheduler.pt")
    torch.save(ckpt.rng, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(ckpt.state)))
    (tmp / COMPLETE_MARKER).write_text("")
    _fsync_dir(tmp)
    final = _publish(root, tmp, ckpt.state.step)
    rotate(root, keep)
    return final


def _publish(root: Path, folder: Path, step: int) -> Path:
    """Rename a complete checkpoint folder (on the same filesystem) into place under `root`."""
    # A unique suffix: after a resume the same step can be saved again.
    final = root / f"checkpoint-{step:08d}-{uuid.uuid4().hex[:6]}"
    os.rename(folder, final)
    _fsync_dir(root)
    return final


def scratch(root: Path) -> Path:
    """A new hidden folder under `root` for a checkpoint on its way in; discovery ignores it,
    `rotate` removes it if it is left behind."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    folder.mkdir()
    return folder


def adopt(root: Path, folder: Path) -> Path:
    """Move `folder`, a checkpoint fetched into a `scratch` folder of `root`, into place; it
    must be complete and readable (ValueError otherwise). Returns its new path."""
    if not is_complete(folder):
        raise ValueError(f"{folder} is not a complete checkpoint (no {COMPLETE_MARKER} or state)")
    try:
        step = read_state(folder).step
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{folder / STATE_FILE} is unreadable: {exc}") from None
    return _publish(root, folder, step)


def rotate(root: Path, keep: int) -> None:
    for _, folder in list_complete(root)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def load(folder: Path) -> Checkpoint:
    return Checkpoint(
        state=read_state(folder),
        trainable=load_file(folder / "trainable.safetensors"),
        optimizer=torch.load(folder / "optimizer.pt", weights_only=True),
        scheduler=torch.load(folder / "scheduler.pt", weights_only=True),
        rng=_load_rng(folder / "rng.pt"),
    )


def _load_rng(path: Path) -> list[dict[str, Any]]:
    """The ranks' RNG states, through the weights-only unpickler: a checkpoint may come from the
    Hub (checkpoint_mirror.py), where a full unpickler would run whatever the file says. numpy's
    generator state holds a uint32 array, so exactly what rebuilds one is allowed besides."""
    uint32 = np.dtype(np.uint32)
    rebuild = np.zeros(1, dtype=uint32).__reduce__()[0]  # numpy's array _reconstruct
    with torch.serialization.safe_globals([rebuild, np.ndarray, np.dtype, type(uint32)]):
        return torch.load(path, weights_only=True)
