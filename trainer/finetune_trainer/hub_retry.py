"""Retry a Hub call that may succeed on a later try: 408, 429, 5xx and connection errors.

huggingface_hub retries its file transfers itself (`http_backoff`: 5 retries, waits from 1 s
doubling to 8 s, on 408/429/500/502/503/504 and transport errors), but not its repo, branch and
commit calls. `with_backoff` wraps those with the same policy, so one Hub outage is waited out
the same way everywhere. Anything else (401, 403, 404, a bad request) is raised at once: waiting
cannot fix it.

huggingface_hub is imported inside functions, as in publish.py: it reads its settings when first
imported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from finetune_api.result import scrub

__all__ = ["HUB_BACKOFF", "RETRY_STATUS", "Backoff", "transient", "with_backoff"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# huggingface_hub's own list (utils._http._DEFAULT_RETRY_ON_STATUS_CODES).
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# A Retry-After longer than this is not honoured in full: the caller's own deadline matters more.
MAX_RETRY_AFTER_SECONDS = 60.0


@dataclass(frozen=True)
class Backoff:
    """How often and how long to wait: huggingface_hub's `http_backoff` defaults."""

    retries: int = 5
    base_seconds: float = 1.0
    max_seconds: float = 8.0

    def waits(self) -> Iterator[float]:
        wait = self.base_seconds
        for _ in range(self.retries):
            yield wait
            wait = min(self.max_seconds, wait * 2)


HUB_BACKOFF = Backoff()


def transient(exc: BaseException) -> bool:
    """Whether `exc` is worth another try: a retryable HTTP status or a transport failure."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False  # a setting, not an outage
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        return response is not None and response.status_code in RETRY_STATUS
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return min(float(value), MAX_RETRY_AFTER_SECONDS) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own wait


def with_backoff(
    call: Callable[[], T],
    what: str,
    backoff: Backoff = HUB_BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`call()`, retried on transient errors with exponential backoff; the last error is raised.

    `what` names the operation in the warning logged before each retry (scrubbed of tokens).
    """
    waits = backoff.waits()
    while True:
        try:
            return call()
        except Exception as exc:
            wait = next(waits, None) if transient(exc) else None
            if wait is None:
                raise
            wait = max(wait, _retry_after(exc) or 0.0)
            log.warning(
                "%s failed (%s), retrying in %.0f s",
                what,
                scrub(f"{type(exc).__name__}: {exc}")[:300],
                wait,
            )
            sleep(wait)
