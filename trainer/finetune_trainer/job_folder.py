"""The job's checkpoint folder: where it is, the names of what is kept in it, and what a full
volume means for the spec (`no_space`: the field that sizes it).

Nothing here imports torch: `finetune train` looks into the folder before it imports the trainer
(finetune_trainer.prefetch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from decimal import Decimal
from pathlib import Path

from finetune_api import FieldError, FineTuneJob, ManifestError, pod

# Written last into a checkpoint and into the final artifact: a folder without it is not whole.
COMPLETE_MARKER = "COMPLETE"
# Checkpoints and the final artifact are written under this prefix and renamed into place;
# checkpoint.rotate sweeps what a killed save left.
TMP_PREFIX = ".tmp-"
# The final artifact, kept until it is pushed (finetune_trainer.final).
FINAL_FOLDER = "final"


def checkpoint_root(job: FineTuneJob) -> Path:
    """The job's checkpoint folder, keyed by what shapes training: a changed spec on a reused
    volume starts afresh instead of resuming someone else's run.

    Fields at their defaults stay out of the key: a field that a later version adds with a
    default then leaves the folder of a job that does not set it where it was, so an upgrade
    between restarts still resumes.
    """
    s = job.spec
    # gradientCheckpointing changes memory, compile the kernels, and checkpointEverySeconds
    # when saves happen, not what is trained (a checkpoint resumes bit-identically).
    training = s.training.model_dump(
        mode="json",
        exclude_defaults=True,
        exclude={"gradient_checkpointing", "compile", "checkpoint_every_seconds"},
    )
    shape = [
        *(m.model_dump(mode="json", exclude_defaults=True) for m in (s.model, s.dataset, s.peft)),
        training,
        s.evaluation.metrics,
        s.resources.nodes,
        s.resources.processes_per_node,
    ]
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    return checkpoint_volume() / f"{job.metadata.name}-{digest}"


def checkpoint_volume() -> Path:
    """Where the checkpoint volume is mounted (another folder in local runs and tests)."""
    return Path(os.environ.get(pod.CHECKPOINT_DIR_ENV) or pod.CHECKPOINT_DIR)


def no_space(what: str, where: Path, hint: str = "") -> ManifestError:
    """A full volume, as the spec field that sizes it: another attempt would fill it again."""
    if where.is_relative_to(checkpoint_volume()):
        field = "spec.output.checkpoints.size"
        size = (
            "the checkpoint claim (output.checkpoints.size, or your persistentVolumeClaim's size)"
        )
    else:
        field, size = "spec.template.cacheSize", "template.cacheSize"
    message = f"no space left for {what} in {where}: make {size} larger{hint}"
    return ManifestError([FieldError(field, message)])


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds (or will hold) `path`, which need not exist yet."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


# A Kubernetes quantity's suffixes, as bytes (the spec's sizes allow these: SIZE_PATTERN).
_SCALES = {
    **{f"{p}i": 2 ** (10 * (i + 1)) for i, p in enumerate("KMGTPE")},
    **{p: 10 ** (3 * (i + 1)) for i, p in enumerate("kMGTPE")},
}


def quantity_bytes(size: str | int) -> int:
    """The bytes a Kubernetes quantity (20Gi, 500M, 1.5Gi, 1e9) names, rounded up."""
    text = str(size)
    number, scale = text, 1
    if text[-2:] in _SCALES:
        number, scale = text[:-2], _SCALES[text[-2:]]
    elif text[-1:] in _SCALES:
        number, scale = text[:-1], _SCALES[text[-1:]]
    return math.ceil(Decimal(number) * scale)


def quantity(size: int) -> str:
    """`size` bytes as a Kubernetes binary quantity, rounded up (what a spec's size would say)."""
    for unit, scale in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= scale:
            return f"{math.ceil(10 * size / scale) / 10:g}{unit}"
    return str(size)


def final_kept(root: Path) -> bool:
    """Whether an earlier attempt kept a whole final artifact in `root` (of whatever kind:
    `final.load` tells whether it is the one the spec asks for)."""
    return (root / FINAL_FOLDER / COMPLETE_MARKER).is_file()
