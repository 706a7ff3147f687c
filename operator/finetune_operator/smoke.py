"""The smoke request after a rollout: one short chat completion through the serving Service.

aiohttp (kopf's own HTTP client) keeps it on the event loop without blocking it, with a timeout,
and it never raises: a server that does not answer is a failed smoke test, which the status
reports, not an error for kopf to retry.
"""

from __future__ import annotations

import json
import logging

import aiohttp

from finetune_operator.serve_status import Smoke

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20
SMOKE_PROMPT = "Say hello."
SMOKE_MAX_TOKENS = 8


def smoke_payload(model: str) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": SMOKE_PROMPT}],
        "max_tokens": SMOKE_MAX_TOKENS,
        "stream": False,
    }


def judge(status: int, body: object) -> Smoke:
    """A chat completion answered: 200 and a first choice whose message content is a string."""
    if status != 200:
        return Smoke(False, f"HTTP {status}: {str(body)[:300]}")
    try:
        content = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return Smoke(False, f"not a chat completion: {str(body)[:300]}")
    if not isinstance(content, str):
        return Smoke(False, f"no text in the answer: {str(body)[:300]}")
    return Smoke(True)


async def chat_smoke(base_url: str, model: str, timeout: float) -> Smoke:
    """POST `<base_url>/chat/completions`; the verdict, never an exception."""
    url = base_url.rstrip("/") + "/chat/completions"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.post(url, json=smoke_payload(model)) as response,
        ):
            raw = await response.content.read(MAX_BODY)
            try:
                body: object = json.loads(raw)
            except ValueError:
                body = raw[:300].decode(errors="replace")
            return judge(response.status, body)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Smoke(False, f"{type(exc).__name__}: {exc}"[:500])
