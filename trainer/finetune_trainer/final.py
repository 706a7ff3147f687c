"""The final artifact, kept in the checkpoint folder until it is pushed, so that a push is never
paid for with a second training.

Rank 0 saves it when training and evaluation are done and the gates passed, before the push: the
artifact's files (adapter, merged or full model, with the tokenizer) and the TrainerResult of the
attempt that trained it, which holds what the model card and the final result need (the
evaluation, steps and loss). It is written as a checkpoint is (finetune_trainer.checkpoint): into
a hidden temporary folder, completion marker last, then renamed to `final`, so a gang killed
mid-save leaves nothing that counts, and checkpoint rotation sweeps the leftover. An attempt that
finds it complete, for the artifact kind the spec asks for, skips training and evaluation and
only pushes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from finetune_api.result import TrainerResult
from finetune_trainer.checkpoint import _fsync_dir, writing

# Shared with checkpoints: the same marker, and a temporary prefix that checkpoint.rotate sweeps.
from finetune_trainer.job_folder import COMPLETE_MARKER, FINAL_FOLDER, TMP_PREFIX, final_kept

ARTIFACT = "artifact"
RESULT_FILE = "result.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedFinal:
    folder: Path
    # The result of the attempt that trained it: Succeeded, before any push.
    result: TrainerResult

    @property
    def artifact_dir(self) -> Path:
        return self.folder / ARTIFACT


def save(root: Path, artifact_dir: Path, result: TrainerResult) -> SavedFinal:
    """Copy `artifact_dir` and `result` into `root/final`, atomically."""
    with writing(root) as tmp:
        shutil.copytree(artifact_dir, tmp / ARTIFACT)
        # The whole result, not the clipped termination message: every score is kept.
        (tmp / RESULT_FILE).write_text(result.model_dump_json(by_alias=True, exclude_none=True))
        (tmp / COMPLETE_MARKER).write_text("")
        _fsync_dir(tmp)
    final = root / FINAL_FOLDER
    if final.exists():  # one of another artifact kind (see `load`): this one replaces it
        stale = root / f"{TMP_PREFIX}{FINAL_FOLDER}-stale-{uuid.uuid4().hex}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    return SavedFinal(final, result)


def load(root: Path, artifact: str) -> SavedFinal | None:
    """The complete final artifact under `root` of kind `artifact`, or None."""
    folder = root / FINAL_FOLDER
    if not final_kept(root) or not (folder / ARTIFACT).is_dir():
        return None
    try:
        result = TrainerResult.model_validate_json((folder / RESULT_FILE).read_text())
    except (OSError, ValidationError) as exc:
        log.warning("ignoring the saved final artifact in %s: %s", folder, exc)
        return None
    if not result.succeeded or result.artifact != artifact:
        return None
    return SavedFinal(folder, result)
