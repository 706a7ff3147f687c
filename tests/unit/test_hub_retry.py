"""with_backoff: which Hub errors are retried, and how long it waits between tries."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from finetune_trainer.hub_retry import Backoff, transient, with_backoff


def http_error(status: int, **headers: str) -> HfHubHTTPError:
    request = httpx2.Request("POST", "http://hub.invalid/api/models/org/repo/commit/main")
    response = httpx2.Response(status, headers=headers, request=request)
    return HfHubHTTPError(f"{status} from the Hub", response=response)


def wrapped(cause: Exception) -> Exception:
    try:
        raise cause
    except Exception:
        try:
            raise RuntimeError("wrapped") from cause
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (http_error(429), True),
        (http_error(503), True),
        (http_error(408), True),
        (http_error(409), True),  # another commit landed first
        (httpx2.ConnectError("refused"), True),
        (http_error(401), False),
        (http_error(403), False),
        (http_error(404), False),
        (OfflineModeIsEnabled("offline"), False),
        (ValueError("a bug"), False),
        (wrapped(http_error(503)), True),  # huggingface_hub wraps some errors
    ],
)
def test_transient(error: Exception, retried: bool) -> None:
    assert transient(error) is retried


def test_backoff_waits_doubling_and_honours_retry_after() -> None:
    failures = [http_error(429, **{"Retry-After": "3"}), http_error(503), http_error(502)]
    sleeps: list[float] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    assert with_backoff(call, "test", Backoff(retries=5), sleeps.append) == "done"
    assert sleeps == [3.0, 2.0, 4.0]  # Retry-After beats the first wait (1 s)


def test_gives_up_after_the_retries_and_raises_the_last_error() -> None:
    sleeps: list[float] = []

    def call() -> None:
        raise http_error(503)

    with pytest.raises(HfHubHTTPError, match="503"):
        with_backoff(call, "test", Backoff(retries=4, max_seconds=2.0), sleeps.append)
    assert sleeps == [1.0, 2.0, 2.0, 2.0]


def test_permanent_errors_are_raised_at_once() -> None:
    sleeps: list[float] = []

    def call() -> None:
        raise http_error(403)

    with pytest.raises(HfHubHTTPError, match="403"):
        with_backoff(call, "test", sleep=sleeps.append)
    assert sleeps == []
