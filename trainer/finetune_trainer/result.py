"""The trainer's result: JSON in FINETUNE_RESULT_FILE, which becomes the pod's termination message.

Kubernetes keeps at most 4 KiB of a termination message, so the document is trimmed to fit, and
the Hub token is scrubbed from anything that came from an exception.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_operator.api.constants import DEFAULT_RESULT_FILE
from finetune_trainer.env import RESULT_FILE_ENV
from finetune_trainer.publish import redact

MAX_BYTES = 4096
# Hub user tokens; an exception message may quote one even when HF_TOKEN is unset here.
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
log = logging.getLogger(__name__)


def scrub(text: str) -> str:
    """publish.redact (HF_TOKEN, bearer headers, long hf_ tokens), plus shorter hf_ tokens."""
    return _TOKEN_PATTERN.sub("***", redact(text))


@dataclass
class TrainResult:
    status: Literal["Succeeded", "Failed"]
    reason: str
    message: str = ""
    evaluation: dict[str, dict[str, float | None]] = field(default_factory=dict)
    repo: str | None = None
    revision: str | None = None
    url: str | None = None
    artifact: Literal["adapter", "merged", "full"] = "adapter"
    steps: int = 0
    train_loss: float | None = None
    resumed_from_step: int | None = None
    # Real (non-pad) tokens per second over all ranks, for this attempt's training loop.
    tokens_per_second: float | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "status": self.status,
            "reason": self.reason,
            "message": scrub(self.message),
            "evaluation": self.evaluation,
            "repo": self.repo,
            "revision": self.revision,
            "url": self.url,
            "artifact": self.artifact,
            "steps": self.steps,
            "trainLoss": self.train_loss,
            "resumedFromStep": self.resumed_from_step,
            "tokensPerSecond": self.tokens_per_second,
        }
        text = json.dumps(doc, separators=(",", ":"))
        overflow = len(text.encode()) - MAX_BYTES
        if overflow > 0:
            # The message is the only free-form field; the rest is what the operator acts on.
            keep = max(0, len(doc["message"].encode()) - overflow - 16)
            doc["message"] = doc["message"].encode()[:keep].decode(errors="ignore") + "…"
            text = json.dumps(doc, separators=(",", ":"))
        return text


def result_path() -> Path:
    return Path(os.environ.get(RESULT_FILE_ENV) or DEFAULT_RESULT_FILE)


def write_result(doc: TrainResult | dict[str, Any], path: Path | None = None) -> Path:
    """Write the result; off-cluster /dev/termination-log is usually absent, so fall back."""
    text = doc.to_json() if isinstance(doc, TrainResult) else scrub(json.dumps(doc))
    target = path or result_path()
    try:
        target.write_text(text + "\n")
        return target
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / "finetune-result.json"
        log.warning("cannot write result to %s (%s); writing %s instead", target, exc, fallback)
        fallback.write_text(text + "\n")
        return fallback
