"""Fault injection for the Hub double: fail the next N requests of one kind, for tests only.

Off unless the double is started with ``faults=True`` (CLI ``--test-faults``, or the env
``HUB_DOUBLE_TEST_FAULTS=1``). When on, ``/_test/faults`` takes orders over HTTP::

    POST   /_test/faults  {"kind": "commit", "status": 503, "count": 3}  -> 200 {"pending": [...]}
    GET    /_test/faults  -> {"pending": [{"kind", "status", "count"}...], "fired": {"commit": 3}}
    DELETE /_test/faults  -> forget every pending fault and the fired counts

In-process, ``HubDouble.faults.add("commit", 503, 3)`` does the same. A matching request gets the
status with the Hub's error headers and no effect; its body is read first, so keep-alive holds,
and an LFS upload ticket stays valid for the client's retry. Orders queue per kind and are served
first in, first out; ``any`` matches every request but those to ``/_test``.

Kinds, by what the client does:

- ``create``: ``POST /api/repos/create``
- ``preupload``: ``POST /api/<type>s/<repo>/preupload/<rev>``
- ``upload``: the LFS batch call and the LFS object ``PUT``
- ``commit``: ``POST /api/<type>s/<repo>/commit/<rev>``
- ``settings``: ``PUT /api/<type>s/<repo>/settings`` (``update_repo_settings``: visibility)
- ``download``: ``GET``/``HEAD`` of ``/<repo>/resolve/<rev>/<path>``
- ``any``: all of the above and every other route
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Final

ENV: Final = "HUB_DOUBLE_TEST_FAULTS"
PATH: Final = "/_test/faults"
KINDS: Final = ("create", "preupload", "upload", "commit", "settings", "download", "any")
MAX_COUNT: Final = 10_000


@dataclass
class Fault:
    kind: str
    status: int
    count: int


def request_kind(method: str, parts: list[str]) -> str | None:
    """The fault kind of a request (`parts`: its path split on '/'), or None for other routes."""
    if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
        return "upload"
    if parts[:1] == ["api"]:
        if parts[1:3] == ["repos", "create"]:
            return "create"
        if len(parts) >= 5 and parts[1] in ("models", "datasets", "spaces") and method == "POST":
            return {"preupload": "preupload", "commit": "commit"}.get(parts[4])
        if len(parts) == 5 and parts[1] in ("models", "datasets", "spaces") and method == "PUT":
            return "settings" if parts[4] == "settings" else None
        return None
    rest = parts[1:] if parts[:1] in (["datasets"], ["spaces"]) else parts
    if rest[2:] == ["info", "lfs", "objects", "batch"]:
        return "upload"
    if len(rest) >= 5 and rest[2] == "resolve":
        return "download"
    return None


class Faults:
    """Pending faults by kind and how many fired; safe to use from the server's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[Fault] = deque()
        self.fired: Counter[str] = Counter()

    def add(self, kind: str, status: int, count: int = 1) -> None:
        """Fail the next `count` requests of `kind` with HTTP `status` (400-599)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error (400-599), not {status}")
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be 1-{MAX_COUNT}, not {count}")
        with self._lock:
            self._pending.append(Fault(kind, status, count))

    def take(self, kind: str | None) -> int | None:
        """The status to answer a request of `kind` with, consuming one pending fault; or None."""
        with self._lock:
            for fault in self._pending:
                if fault.kind == "any" or fault.kind == kind:
                    fault.count -= 1
                    if fault.count == 0:
                        self._pending.remove(fault)
                    self.fired[kind or "other"] += 1
                    return fault.status
        return None

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self.fired.clear()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"pending": [asdict(f) for f in self._pending], "fired": dict(self.fired)}

    def order(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One call to /_test/faults; raises ValueError on a malformed order."""
        if method == "POST":
            status, count = payload.get("status", 503), payload.get("count", 1)
            if not isinstance(status, int) or not isinstance(count, int):
                raise ValueError("status and count must be integers")
            self.add(str(payload.get("kind", "any")), status, count)
        elif method == "DELETE":
            self.clear()
        return self.state()
