"""Read the trainer's result from a pod's termination message, defensively.

The message is written by our trainer but passes through the kubelet (4 KiB cap, log fallback on
crash), so it may be truncated, not JSON, or log text. Nothing here raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE_BYTES = 16 * 1024
MAX_TEXT = 1024


@dataclass(frozen=True)
class TrainerResult:
    status: str | None = None
    reason: str | None = None
    message: str | None = None
    evaluation: dict[str, dict[str, float | None]] = field(default_factory=dict)
    repo: str | None = None
    revision: str | None = None
    url: str | None = None
    artifact: str | None = None
    steps: int | None = None
    train_loss: float | None = None


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)[:limit]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _evaluation(raw: Any) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    if not isinstance(raw, dict):
        return out
    for name, score in list(raw.items())[:32]:
        if isinstance(score, dict):
            out[str(name)[:128]] = {
                "before": _number(score.get("before")),
                "after": _number(score.get("after")),
            }
        elif _number(score) is not None:
            out[str(name)[:128]] = {"before": None, "after": _number(score)}
    return out


def parse_termination_message(message: str | None) -> TrainerResult | None:
    """The trainer's result, or None when the message is absent or not a result object."""
    if not message or len(message.encode("utf-8", "replace")) > MAX_MESSAGE_BYTES:
        return None
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    steps = data.get("steps")
    return TrainerResult(
        status=_text(data.get("status"), 32),
        reason=_text(data.get("reason"), 128),
        message=_text(data.get("message")),
        evaluation=_evaluation(data.get("evaluation")),
        repo=_text(data.get("repo"), 256),
        revision=_text(data.get("revision"), 64),
        url=_text(data.get("url"), 2048),
        artifact=_text(data.get("artifact"), 16),
        steps=steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
        train_loss=_number(data.get("trainLoss")),
    )
