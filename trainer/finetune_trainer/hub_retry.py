"""Retry a Hub call that may succeed on a later try: 408, 409, 425, 429, 5xx and connection errors.

huggingface_hub retries its file transfers itself (`http_backoff`: 5 retries, waits from 1 s
doubling to 8 s, on 408/429/500/502/503/504 and transport errors), but not its repo, branch and
commit calls. `with_backoff` wraps those with the same policy, so one Hub outage is waited out
the same way everywhere: the final push (publish.py) and the checkpoint mirror. It also retries a
409 (another commit landed first) and a 425. Anything else is raised at once: a permanent
refusal (401, 403, a missing namespace, any other 4xx, a repo id the client refuses), which
waiting cannot fix, or an error that is not the Hub's at all.

huggingface_hub is imported inside functions, as in publish.py: it reads its settings when first
imported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

from finetune_api.result import scrub

__all__ = ["HUB_BACKOFF", "Backoff", "FailureClass", "failure_class", "transient", "with_backoff"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# Client errors that a later try can pass: a timeout, a conflicting commit, a rate limit.
_TRANSIENT_CLIENT_STATUS = frozenset({408, 409, 425, 429})
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


FailureClass = Literal["transient", "permanent", "other"]


def failure_class(exc: BaseException) -> FailureClass:
    """Whether a failed Hub call is worth another try, from the first HTTP status or transport
    error in the exception's chain (huggingface_hub wraps some of them): `transient` (retry),
    `permanent` (the Hub refused it: credentials, permissions, a name) or `other`."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, HFValidationError):
            return "permanent"  # a repo id the client refuses
        if isinstance(seen, OfflineModeIsEnabled):
            return "other"  # a setting of this pod, not the Hub's state
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            status = seen.response.status_code
            if status >= 500 or status in _TRANSIENT_CLIENT_STATUS:
                return "transient"
            return "permanent" if status >= 400 else "other"
        if isinstance(seen, httpx2.TransportError | ConnectionError | TimeoutError):
            return "transient"
        seen = seen.__cause__ or seen.__context__
    return "other"


def transient(exc: BaseException) -> bool:
    """Whether `exc` is worth another try."""
    return failure_class(exc) == "transient"


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
