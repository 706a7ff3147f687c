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

import errno
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finetune_api import ManifestError
from finetune_trainer.job_folder import (
    COMPLETE_MARKER,
    TMP_PREFIX,
    free_bytes,
    no_space,
    quantity,
)

STATE_FILE = "trainer_state.json"

log = logging.getLogger(__name__)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write a checkpoint atomically and delete the oldest beyond `keep`.

    A full store first makes room: every checkpoint but the newest goes, and the write is tried
    once more, so training goes on with fewer kept than `keep`. If the store cannot hold even the
    newest and this one, the error names the spec field that sizes it: another attempt would
    only train to the same save and fail there again."""
    for last_try in (False, True):
        try:
            final = _write(root, ckpt)
            break
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            older = [folder for _, folder in list_complete(root)[:-1]]
            if last_try or not older:
                raise _no_room(root, ckpt, keep) from exc
            log.warning(
                "no space left in %s for the checkpoint of step %d: deleting %d older checkpoint(s)"
                " to keep training; the store holds fewer than checkpointsToKeep=%d",
                root,
                ckpt.state.step,
                len(older),
                keep,
            )
            for folder in older:
                shutil.rmtree(folder, ignore_errors=True)
    rotate(root, keep)
    return final


def _write(root: Path, ckpt: Checkpoint) -> Path:
    with writing(root) as tmp:
        _save_tensors(
            {k: v.detach().cpu().contiguous() for k, v in ckpt.trainable.items()},
            tmp / "trainable.safetensors",
        )
        states = {"optimizer": ckpt.optimizer, "scheduler": ckpt.scheduler, "rng": ckpt.rng}
        for name, state in states.items():
            _torch_save(state, tmp / f"{name}.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(ckpt.state)))
        (tmp / COMPLETE_MARKER).write_text("")
        _fsync_dir(tmp)
    return _publish(root, tmp, ckpt.state.step)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O errors raised as OSError: its Rust writer reports them as
    SafetensorError, with the errno only in the text ("No space left on device (os error 28)")."""
    try:
        save_file(tensors, path)
    except SafetensorError as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a failed write raises OSError with its errno: given a
    path, torch's own writer fails with a RuntimeError that names no cause."""
    with path.open("wb") as f:
        torch.save(obj, f)


def _no_room(root: Path, ckpt: Checkpoint, keep: int) -> ManifestError:
    size = quantity(_nbytes([ckpt.trainable, ckpt.optimizer, ckpt.scheduler, ckpt.rng]))
    kept = [step for step, _ in list_complete(root)]
    also = f"; the one of step {kept[-1]} is kept" if kept else ""
    return no_space(
        f"the checkpoint of step {ckpt.state.step} (about {size})", root, _room_for(keep) + also
    )


def _room_for(keep: int) -> str:
    return (
        f", to hold training.checkpointsToKeep + 1 = {keep + 1} checkpoints and the model and data"
        " cached there, if any (a checkpoint is deleted only once the next is written)"
    )


# AdamW keeps two moments of each trainable weight, in the weight's dtype.
ADAMW_MOMENTS = 2


def expected_size(model: torch.nn.Module) -> int:
    """About the bytes of one checkpoint of `model`, whole (before it is sharded): its trainable
    weights and AdamW's moments of them. The scheduler's and the RNG states are small beside."""
    return (1 + ADAMW_MOMENTS) * _nbytes([p for p in model.parameters() if p.requires_grad])


def saves_due(step: int, total_steps: int, every: int) -> int:
    """How many checkpoints a run from `step` to `total_steps` writes: at each multiple of
    `every`, and at the last step."""
    if total_steps <= step:
        return 0
    return total_steps // every - step // every + (1 if total_steps % every else 0)


def check_room(root: Path, size: int, saves: int, keep: int) -> None:
    """Fail before training, not at a save an hour into it, when the store cannot hold what
    `save` needs at the least: the newest checkpoint and the next, each about `size`, once the
    run (with `saves` still due) has two. A lower bound, so it refuses no store that would do;
    `save` handles what it misses."""
    held = list_complete(root)
    if saves + min(len(held), 1) < 2:
        return
    room = free_bytes(root) + sum(disk_bytes(folder) for _, folder in held)
    if 2 * size > room:
        raise no_space(
            f"the newest checkpoint and the next, about {quantity(size)} each (the trainable "
            f"weights and AdamW's two moments of each), with {quantity(room)} free",
            root,
            _room_for(keep),
        )


def disk_bytes(folder: Path) -> int:
    """What a checkpoint folder takes in its store, and deleting it frees: its files' blocks."""
    return sum(f.stat().st_blocks * 512 for f in folder.iterdir() if f.is_file())


def _nbytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (nested dicts and lists): about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


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


@contextmanager
def writing(root: Path) -> Iterator[Path]:
    """A `scratch` folder to write into, deleted if the writing fails: on a full volume its
    partial files would take the room that the next try needs."""
    tmp = scratch(root)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def load_newest(root: Path) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint under `root` that loads, with its folder; None when none does.

    One that does not (a file cut short or damaged in the store, under the marker that says it
    is whole) is set aside with a warning, as a scratch folder that the next save sweeps, and the
    one before it is loaded: the restart loses one more interval, where every attempt would
    otherwise fail at the same load."""
    for step, folder in reversed(list_complete(root)):
        try:
            return folder, load(folder)
        except Exception as exc:  # safetensors', torch's unpickler's, the OS's: each its own
            aside = root / f"{TMP_PREFIX}unreadable-{folder.name}"
            os.rename(folder, aside)
            log.warning(
                "the checkpoint of step %d does not load (%s: %s); set aside as %s, resuming "
                "from the one before it",
                step,
                type(exc).__name__,
                exc,
                aside.name,
            )
    return None


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
