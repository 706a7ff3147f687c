"""Helpers for the trainer tests (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import Any

from finetune_trainer.job_folder import FINAL_FOLDER
from finetune_trainer.testing.gang import FINETUNE, LocalGang, free_ports

__all__ = ["FINETUNE", "Gang", "deep_update", "free_ports"]


def deep_update(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


class Gang(LocalGang):
    """A LocalGang whose ranks write a hash of their trainable weights, to compare them."""

    def start(self, extra_env: Mapping[str, str] | None = None) -> Gang:
        hashes = {"FINETUNE_DEBUG_PARAM_HASH_FILE": str(self.workdir / "params-{rank}.sha256")}
        return super().start({**hashes, **(extra_env or {})})

    def lose_the_newest_checkpoint(self) -> None:
        """As if the gang had been lost after its checkpoint before last: the newest checkpoint,
        the result kept for a retry of its push (where it pushes) and the output are deleted, so
        that the next start resumes from that checkpoint and trains to the end again."""
        [root] = (self.workdir / "checkpoints").iterdir()
        shutil.rmtree(sorted(root.glob("checkpoint-*"))[-1])
        shutil.rmtree(root / FINAL_FOLDER, ignore_errors=True)
        shutil.rmtree(self.workdir / "output")
