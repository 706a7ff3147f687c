"""Fault injection for the Hub double: fail the next N requests of one kind, for tests only.

Off unless the double is started with ``faults=True`` (CLI ``--test-faults``, or the env
``HUB_DOUBLE_TEST_FAULTS=1``). When on, ``/_test/faults`` takes orders over HTTP::

    POST   /_test/faults  {"kind": "commit", "status": 503, "count": 3}  -> 200 {"pending": [...]}
    POST   /_test/faults  {"kind": "commit", "status": 503, "count": 3, "repo": "org/a"}
    GET    /_test/faults  -> {"pending": [{"kind", "status", "count"}...], "fired": {"commit": 3}}
    DELETE /_test/faults  -> forget every pending fault and the fired counts

In-process, ``HubDouble.faults.add("commit", 503, 3)`` does the same. A matching request gets the
status with the Hub's error headers and no effect; its body is read first, so keep-alive holds,
and an LFS upload ticket stays valid for the client's retry. Orders queue per kind and are served
first in, first out; ``any`` matches every request but those to ``/_test``.

An order with ``repo`` (``namespace/name``) matches only requests for that repo, so that tests
sharing one double (concurrent jobs pushing to their own repos) do not take each other's faults;
the state then also counts what fired by repo (``firedByRepo``). The repo of a request is the
one in its path, or in the body of ``/api/repos/create``; the ``PUT`` of an LFS object names
none, so a repo-scoped ``upload`` fault fails that repo's LFS batch calls only.

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

import json
import re
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Final

ENV: Final = "HUB_DOUBLE_TEST_FAULTS"
PATH: Final = "/_test/faults"
KINDS: Final = ("create", "preupload", "upload", "commit", "settings", "download", "any")
MAX_COUNT: Final = 10_000
REPO_ID: Final = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}")


@dataclass
class Fault:
    kind: str
    status: int
    count: int
    repo: str | None = None

    def matches(self, kind: str | None, repo: str | None) -> bool:
        return self.kind in ("any", kind) and (self.repo is None or self.repo == repo)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


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


def request_repo(method: str, parts: list[str], body: bytes = b"") -> str | None:
    """The repo id (``namespace/name``) a request is for, or None when it names none: the path's,
    or for ``/api/repos/create`` (and delete) the JSON body's ``organization``/``name``."""
    if parts[:1] == ["api"]:
        if parts[1:2] == ["repos"]:
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                return None
            if not isinstance(payload, dict) or not payload.get("name"):
                return None
            org = payload.get("organization")
            return f"{org}/{payload['name']}" if org else None
        if len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
            return f"{parts[2]}/{parts[3]}"
        return None
    if method == "PUT" and parts[:1] == ["lfs-upload"]:
        return None
    rest = parts[1:] if parts[:1] in (["datasets"], ["spaces"]) else parts
    if len(rest) >= 3:
        name = rest[1][:-4] if rest[2:3] == ["info"] and rest[1].endswith(".git") else rest[1]
        return f"{rest[0]}/{name}"
    return None


class Faults:
    """Pending faults by kind and how many fired; safe to use from the server's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[Fault] = deque()
        self.fired: Counter[str] = Counter()
        self.fired_by_repo: dict[str, Counter[str]] = {}

    def add(self, kind: str, status: int, count: int = 1, repo: str | None = None) -> None:
        """Fail the next `count` requests of `kind` (for `repo` only, when given) with HTTP
        `status` (400-599)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error (400-599), not {status}")
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be 1-{MAX_COUNT}, not {count}")
        if repo is not None and not REPO_ID.fullmatch(repo):
            raise ValueError(f"repo must be a repo id (namespace/name), not {repo!r}")
        with self._lock:
            self._pending.append(Fault(kind, status, count, repo))

    def take(self, kind: str | None, repo: str | None = None) -> int | None:
        """The status to answer a request of `kind` for `repo` with, consuming one pending fault;
        or None."""
        with self._lock:
            for fault in self._pending:
                if fault.matches(kind, repo):
                    fault.count -= 1
                    if fault.count == 0:
                        self._pending.remove(fault)
                    self.fired[kind or "other"] += 1
                    if fault.repo is not None:
                        self.fired_by_repo.setdefault(fault.repo, Counter())[kind or "other"] += 1
                    return fault.status
        return None

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self.fired.clear()
            self.fired_by_repo.clear()

    def state(self) -> dict[str, Any]:
        with self._lock:
            state: dict[str, Any] = {
                "pending": [f.to_json() for f in self._pending],
                "fired": dict(self.fired),
            }
            if self.fired_by_repo:
                state["firedByRepo"] = {r: dict(c) for r, c in self.fired_by_repo.items()}
            return state

    def order(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One call to /_test/faults; raises ValueError on a malformed order."""
        if method == "POST":
            status, count = payload.get("status", 503), payload.get("count", 1)
            if not isinstance(status, int) or not isinstance(count, int):
                raise ValueError("status and count must be integers")
            repo = payload.get("repo")
            if repo is not None and not isinstance(repo, str):
                raise ValueError("repo must be a string")
            self.add(str(payload.get("kind", "any")), status, count, repo)
        elif method == "DELETE":
            self.clear()
        return self.state()
