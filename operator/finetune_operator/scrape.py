"""Training progress from rank 0's Prometheus endpoint.

The scrape has a short timeout and never raises: a slow or restarting trainer must not stall the
operator, it just leaves the last known progress in place.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from finetune_api.phases import PHASE_GAUGE
from finetune_api.pod import (
    METRICS_PORT,
    RESUMED_FROM_STEP_GAUGE,
    RESUMED_TIMESTAMP_GAUGE,
    STOP_SECONDS_GAUGE,
)
from finetune_operator import timings

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20
_GAUGES = {
    "finetune_train_step": "step",
    "finetune_train_total_steps": "totalSteps",
    "finetune_train_epoch": "epoch",
    "finetune_train_loss": "loss",
    "finetune_train_tokens_per_second": "tokensPerSecond",
    RESUMED_FROM_STEP_GAUGE: "resumedFromStep",
    RESUMED_TIMESTAMP_GAUGE: "resumedAt",
    STOP_SECONDS_GAUGE: "stopSeconds",
}


def _families(text: str) -> list[Any]:
    try:
        return list(text_string_to_metric_families(text))
    except (ValueError, TypeError):
        return []


def parse_metrics(text: str) -> dict[str, float]:
    """Rank 0's values of the trainer gauges (samples of other ranks are skipped)."""
    return _gauges(_families(text))


def parse_phases(text: str) -> dict[str, float]:
    """Rank 0's phase stamps (finetune_api.phases names, Unix seconds) from its phase gauge."""
    return _stamps(_families(text))


def _gauges(families: list[Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in families:
        key = _GAUGES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.labels.get("rank", "0") == "0":
                values[key] = float(sample.value)
                break
    return values


def _stamps(families: list[Any]) -> dict[str, float]:
    stamps: dict[str, float] = {}
    for family in families:
        if family.name != PHASE_GAUGE:
            continue
        for sample in family.samples:
            name = sample.labels.get("phase")
            if name and sample.labels.get("rank", "0") == "0" and sample.value > 0:
                stamps[name] = float(sample.value)
    return stamps


def _seconds_between(earlier: str, later: str) -> float | None:
    try:
        a = datetime.fromisoformat(earlier.replace("Z", "+00:00"))
        b = datetime.fromisoformat(later.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (b - a).total_seconds()


def progress_from_metrics(
    values: dict[str, float], previous: dict[str, Any] | None, now: str
) -> dict[str, Any] | None:
    """A status.progress object; the ETA comes from the step rate since the previous reading."""
    if "step" not in values:
        return None
    step = int(values["step"])
    total = int(values.get("totalSteps", 0))
    progress: dict[str, Any] = {
        "step": step,
        "totalSteps": total,
        "epoch": round(max(values.get("epoch", 0.0), 0.0), 4),
        "percent": min(100, int(step * 100 / total)) if total > 0 else 0,
        "updatedAt": now,
    }
    if (loss := values.get("loss")) is not None and loss == loss:  # NaN != NaN
        progress["loss"] = round(loss, 6)
    if (tps := values.get("tokensPerSecond")) is not None and tps >= 0:
        progress["tokensPerSecond"] = round(tps, 2)
    prev_step = (previous or {}).get("step")
    prev_at = (previous or {}).get("updatedAt")
    if isinstance(prev_step, int) and prev_at and step > prev_step and total > step:
        elapsed = _seconds_between(prev_at, now)
        if elapsed and elapsed > 0:
            progress["etaSeconds"] = int((total - step) * elapsed / (step - prev_step))
    return progress


def resumed_from_step(values: dict[str, float]) -> int | None:
    """The step the running attempt resumed from (0: a fresh start); None before it says."""
    value = values.get("resumedFromStep")
    return int(value) if value is not None and value >= 0 else None


def resumed_at(values: dict[str, float]) -> str | None:
    """When (RFC 3339) the running gang resumed from that step; None before it says."""
    value = values.get("resumedAt")
    if value is None or not value > 0:
        return None
    return timings.rfc3339(value)


def stop_seconds(values: dict[str, float]) -> float | None:
    """What rank 0 estimates a stop takes (its longest recent step and its last save); None
    before its first save."""
    value = values.get("stopSeconds")
    return value if value is not None and value >= 0 else None


async def scrape(
    ip: str, timeout: float, port: int = METRICS_PORT
) -> tuple[dict[str, float], dict[str, float]]:
    """Rank 0's gauges (parse_metrics) and phase stamps (parse_phases); empty when it does not
    answer."""
    url = f"http://{ip}:{port}/metrics"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return {}, {}
            body = await resp.content.read(MAX_BODY)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.debug("scrape %s failed: %s", url, exc)
        return {}, {}
    # Parsed once: this runs every progress interval for every training gang.
    families = _families(body.decode("utf-8", "replace"))
    return _gauges(families), _stamps(families)
