"""Write this pod's `TrainerResult` (finetune_api.result) where the kubelet reads it.

The file is FINETUNE_RESULT_FILE, by default the container's termination-message path, so the
result becomes the pod's termination message: what the operator reads the verdict from.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from finetune_api import pod
from finetune_api.result import TrainerResult

log = logging.getLogger(__name__)


def result_path() -> Path:
    return Path(os.environ.get(pod.RESULT_FILE_ENV) or pod.RESULT_FILE)


def write_result(result: TrainerResult, path: Path | None = None) -> Path:
    """Write the result; off-cluster /dev/termination-log is usually absent, so fall back."""
    text = result.to_message()
    target = path or result_path()
    try:
        target.write_text(text + "\n")
        return target
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / "finetune-result.json"
        log.warning("cannot write result to %s (%s); writing %s instead", target, exc, fallback)
        fallback.write_text(text + "\n")
        return fallback


def write_failure(
    rank: int, reason: str, message: str, phases: Mapping[str, float] | None = None
) -> None:
    """A failed attempt's result. Rank 0's is the whole account, with its process's phase
    stamps (`phases`): when its gang formed dates the pods that came after it, which tells the
    operator that a member left unseen (restarts.departed_unseen). The first rank of every
    other pod writes its own reason and message, which the operator reads when rank 0 could not
    write (it was stopped, or killed)."""
    if rank == 0:
        stamps = dict(phases or {})
        write_result(TrainerResult(status="Failed", reason=reason, message=message, phases=stamps))
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        write_result(TrainerResult(status="Failed", reason=reason, message=message, rank=rank))
