"""The job's checkpoint folder: where it is, and the names of what is kept in it.

Nothing here imports torch: `finetune train` looks into the folder before it imports the trainer
(finetune_trainer.prefetch).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune_api import FineTuneJob, pod

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
    base = Path(os.environ.get(pod.CHECKPOINT_DIR_ENV) or pod.CHECKPOINT_DIR)
    s = job.spec
    # gradientCheckpointing changes memory, and compile the kernels, not what is trained.
    training = s.training.model_dump(
        mode="json", exclude_defaults=True, exclude={"gradient_checkpointing", "compile"}
    )
    shape = [
        *(m.model_dump(mode="json", exclude_defaults=True) for m in (s.model, s.dataset, s.peft)),
        training,
        s.evaluation.metrics,
        s.resources.nodes,
        s.resources.processes_per_node,
    ]
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    return base / f"{job.metadata.name}-{digest}"


def final_kept(root: Path) -> bool:
    """Whether an earlier attempt kept a whole final artifact in `root` (of whatever kind:
    `final.load` tells whether it is the one the spec asks for)."""
    return (root / FINAL_FOLDER / COMPLETE_MARKER).is_file()
