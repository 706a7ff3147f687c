"""A local Hugging Face Hub-API **test double** (not a Hub).

A small standard-library HTTP server that speaks the part of the Hub wire protocol that the real
``huggingface_hub`` client (and so ``transformers``, ``peft`` and ``datasets``) uses to create
repos, push commits (regular files and Git LFS objects) and download files, so that push/pull code
can be tested with no network. Point a client at it with these set *before* ``huggingface_hub`` is
imported (it reads them at import time)::

    HF_ENDPOINT=http://127.0.0.1:<port>  HF_HUB_DISABLE_XET=1  HF_TOKEN=<token, if auth is on>

Repos, blobs and commit history are kept on disk by ``hub_store.Store`` (see that module).
Repo ids must be ``namespace/name``. Branches: create and delete (``create_branch``,
``delete_branch``), commit to one and read at one (``revision=``). Pull requests: a commit with
``create_pr=1`` (``upload_folder(create_pr=True)``) opens one against the branch committed to,
answering its ``pullRequestUrl`` (``.../discussions/N``); its files are read and committed to at
``refs/pr/N``; ``list_repo_refs(include_pull_requests=True)`` lists it and
``get_discussion_details`` describes it (no comments, merging or closing). Not supported: tags,
Xet, gating, pagination.

In-process::

    with HubDouble(tmp_path, tokens=["hf_test"]) as hub:  # or: endpoint = hub.start(); hub.stop()
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}

CLI (also usable as an in-cluster Service)::

    python -m finetune_hub_double --host 0.0.0.0 --port 8080 --root /data \\
        --token "$TOKEN" --seed-model org/base=/models/base --seed-dataset org/data=/data/raw

Tokens are never logged: the access log line is ``METHOD /path STATUS`` (no query, no headers).
Read tokens (``read_tokens``, ``--read-token``) read every repo and are refused every write
with 403, as the Hub refuses a read token. ``HubDouble.requests`` keeps, for tests, the last
requests as ``(METHOD, /path, user)``: which token's user asked for what (never the token).

Fault injection, for tests only (``finetune_hub_double.faults``): started with ``faults=True``,
``--test-faults`` or ``HUB_DOUBLE_TEST_FAULTS=1``, the double fails the next N requests of a kind
(``create``, ``preupload``, ``upload``, ``commit``, ``download`` or ``any``) with a chosen status::

    curl -X POST $HF_ENDPOINT/_test/faults -d '{"kind": "commit", "status": 503, "count": 3}'

With ``"repo": "org/name"`` an order fails only that repo's requests, so that jobs sharing one
double do not take each other's faults. ``GET /_test/faults`` lists what is pending and how many
fired; ``DELETE`` clears both. Off by default: then ``/_test/faults`` is a 404 like any unknown
path.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from finetune_hub_double import faults as fault_injection
from finetune_hub_double.store import (
    DEFAULT_BRANCH,
    DEFAULT_LFS_THRESHOLD,
    SHA256_HEX,
    HubError,
    Store,
    lfs_pointer,
)

__all__ = ["HubDouble", "HubError", "Store", "main"]

log = logging.getLogger("finetune_hub_double")

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_TRUE = ("1", "true", "True")
_CHUNK = 1 << 20
# How many requests HubDouble.requests keeps.
REQUEST_HISTORY = 10_000


class HubDouble:
    """The test double: ``start()`` serves on ``host:port`` in a daemon thread.

    Args:
        root: folder for blobs and repos; what it holds survives restarts.
        host: bind address (127.0.0.1 by default; 0.0.0.0 for a Service).
        port: 0 picks a free port; ``endpoint`` gives the URL after ``start()``.
        tokens: accepted bearer tokens, a list (all map to ``user``) or ``{token: user}``. With
            none (and no read tokens), the double is open: anyone may write, and private repos
            are readable by all. Any accepted token may read and write every repo (no per-user
            permissions).
        read_tokens: accepted tokens that may only read (a list or ``{token: user}``): writes
            with them get 403.
        require_auth_for_read: reads need a valid token too (otherwise only writes, private repos).
        user: the user name ``whoami-v2`` reports; orgs: the orgs it reports.
        lfs_threshold: preupload answers ``uploadMode: lfs`` for files bigger than this.
        faults: serve ``/_test/faults`` and fail requests on order (see ``faults``); None reads
            ``HUB_DOUBLE_TEST_FAULTS``. Off by default.

    A request with a token that is not accepted gets 401 on every route (as on the Hub).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Iterable[str] | Mapping[str, str] | None = None,
        require_auth_for_read: bool = False,
        user: str = "hub-double-user",
        orgs: Iterable[str] = (),
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        faults: bool | None = None,
        read_tokens: Iterable[str] | Mapping[str, str] | None = None,
    ):
        self.store = Store(root, lfs_threshold)
        self.host, self.port = host, port
        self.tokens = _users(tokens, user)
        self.read_tokens = _users(read_tokens, user)
        # (METHOD, /path, user or None) of the last requests, oldest first: who asked for what.
        self.requests: deque[tuple[str, str, str | None]] = deque(maxlen=REQUEST_HISTORY)
        self.require_auth_for_read = require_auth_for_read
        self.user, self.orgs = user, list(orgs)
        self.uploads: dict[str, tuple[str, int]] = {}  # LFS upload ticket -> (sha256, size)
        if faults is None:
            faults = os.environ.get(fault_injection.ENV, "") in _TRUE
        # Test-only: None unless asked for, so a double serving a demo cannot be told to fail.
        self.faults = fault_injection.Faults() if faults else None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def auth(self) -> bool:
        """Whether tokens are checked at all (otherwise the double is open)."""
        return bool(self.tokens or self.read_tokens)

    @property
    def endpoint(self) -> str:
        """``http://host:port`` for ``HF_ENDPOINT`` (127.0.0.1 when bound to all addresses)."""
        if self._server is None:
            raise RuntimeError("HubDouble is not started")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> str:
        """Start serving in a daemon thread; returns ``endpoint``."""
        self._server = ThreadingHTTPServer(
            (self.host, self.port), type("H", (_Handler,), {"hub": self})
        )
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def seed(
        self, repo_id: str, directory: str | os.PathLike[str], repo_type: str = "model"
    ) -> str:
        """Create or update ``repo_id`` from a local folder, server side; returns the head."""
        return self.store.seed(repo_type, repo_id, directory)


def _users(tokens: Iterable[str] | Mapping[str, str] | None, user: str) -> dict[str, str]:
    """``{token: user}`` from a list of tokens (all ``user``) or a mapping."""
    return dict(tokens) if isinstance(tokens, Mapping) else {t: user for t in tokens or ()}


class _Handler(BaseHTTPRequestHandler):
    """One request. Routes: ``/api/...`` (JSON API), ``/<repo>/resolve/<rev>/<path>`` (downloads),
    ``/<repo>.git/info/lfs/objects/batch`` and ``PUT /lfs-upload/<ticket>`` (Git LFS uploads);
    dataset and space repos are prefixed with ``datasets/`` and ``spaces/``."""

    hub: HubDouble
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects: every answer has a length
    server_version = "HubDouble/1.0"
    query: dict[str, str]
    # The user of this request's token, and whether the token may only read.
    user: str | None = None
    read_only: bool = False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the default would log the request line with its query string; see _log

    def _log(self, status: int) -> None:
        path = urlsplit(self.path).path
        log.info("%s %s %d", self.command, path, status)
        self.hub.requests.append((self.command, path, self.user))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():  # header values are latin-1 and on one line
            v = re.sub(r"[\x00-\x1f]", " ", v).encode("latin-1", "replace").decode("latin-1")
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status)

    def _json(self, obj: Any, status: int = 200, **headers: str) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _iter_body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, _CHUNK))
            if not chunk:
                raise HubError(400, "Truncated request body")
            left -= len(chunk)
            yield chunk

    def _base(self) -> str:
        """The URL the client used to reach us, for the URLs we hand back."""
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.hub.endpoint

    def _token_user(self) -> str | None:
        """The user of the bearer token; None without one; 401 for a token not accepted."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            return None
        if not self.hub.auth:
            self.user = self.hub.user
        elif token in self.hub.tokens:
            self.user = self.hub.tokens[token]
        elif token in self.hub.read_tokens:
            self.user, self.read_only = self.hub.read_tokens[token], True
        else:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _auth(self, write: bool) -> str | None:
        user = self._token_user()
        if user is None and self.hub.auth and (write or self.hub.require_auth_for_read):
            raise HubError(401, "Authentication required: send 'Authorization: Bearer <token>'")
        if write and self.read_only:
            raise HubError(403, "You don't have the rights to write with a read token")
        return user

    def _repo(self, repo_type: str, repo_id: str, user: str | None) -> dict[str, Any]:
        repo = self.hub.store.get(repo_type, repo_id)
        if repo["private"] and self.hub.auth and user is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        self.user, self.read_only = None, False  # a kept-alive connection serves many requests
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        streamed = self.command == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload"
        body, body_read = b"", False
        try:
            if not streamed:  # read first: a fault may match on it, and keep-alive needs it read
                body, body_read = self._read_body(), True
            if self.hub.faults is not None and self._injected_fault(url.path, parts, body):
                return
            if streamed:
                return self._lfs_upload(parts[1])  # reads the body itself
            if parts[0] == "api":
                return self._api(parts[1:], body)
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
            rest = parts[1:] if repo_type != "model" else parts
            if len(rest) >= 5 and rest[2] == "resolve" and self.command in ("GET", "HEAD"):
                path = unquote("/".join(rest[4:]))
                return self._resolve(repo_type, f"{rest[0]}/{rest[1]}", unquote(rest[3]), path)
            if rest[2:] == ["info", "lfs", "objects", "batch"] and rest[1].endswith(".git"):
                return self._lfs_batch(repo_type, f"{rest[0]}/{rest[1][:-4]}", body)
            raise HubError(404, f"Not found: {url.path}")
        except HubError as err:
            self.close_connection = self.close_connection or not body_read
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, **headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except ValueError as exc:  # bad JSON, base64, numbers or text in the request
            self.close_connection = self.close_connection or not body_read
            message = f"Malformed request: {type(exc).__name__}"
            self._json({"error": message}, 400, **{"X-Error-Message": message})
        except Exception:  # a bug in the double: log it (never the request headers), answer 500
            log.exception("hub double failed on %s %s", self.command, url.path)
            self.close_connection = True
            self._json({"error": "hub double internal error"}, 500)

    def _injected_fault(self, path: str, parts: list[str], body: bytes) -> bool:
        """Test-only (``faults``): serve ``/_test/faults``, or fail this request if one is due.
        True when the request has been answered here. `body`: the request's, already read unless
        it is a streamed LFS upload."""
        faults = self.hub.faults
        assert faults is not None
        if path.rstrip("/") == fault_injection.PATH:
            try:
                order = json.loads(body or b"{}") if self.command == "POST" else {}
                if not isinstance(order, dict):
                    raise ValueError("the order must be a JSON object")
                state = faults.order(self.command, order)
            except ValueError as exc:
                self._json({"error": str(exc)}, 400, **{"X-Error-Message": str(exc)})
                return True
            self._json(state)
            return True
        kind = fault_injection.request_kind(self.command, parts)
        status = faults.take(kind, fault_injection.request_repo(self.command, parts, body))
        if status is None:
            return False
        if kind == "upload" and parts[:1] == ["lfs-upload"]:
            self._read_body()  # drained, so the connection stays usable for the client's retry
        message = f"Injected test fault: HTTP {status}"
        self._json({"error": message}, status, **{"X-Error-Message": message})
        return True

    # -- JSON API ----------------------------------------------------------------------------------
    def _api(self, parts: list[str], body: bytes) -> None:
        cmd = self.command
        if parts == ["whoami-v2"] and cmd == "GET":
            return self._whoami()
        if parts == ["agent-harnesses"] and cmd == "GET":  # the client fetches this once a day
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if parts == ["validate-yaml"] and cmd == "POST":
            return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
        if parts in (["repos", "create"], ["repos", "delete"]) and cmd in ("POST", "DELETE"):
            return self._create_or_delete(parts[1], json.loads(body or b"{}"))
        if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
            raise HubError(404, f"Not found: /api/{'/'.join(parts)}")
        repo_type, repo_id, rest = parts[0][:-1], f"{parts[1]}/{parts[2]}", parts[3:]
        op = rest[0] if rest else "revision"
        user = self._auth(write=op in ("preupload", "commit", "branch", "settings"))
        repo = self._repo(repo_type, repo_id, user)
        rev = unquote(rest[1]) if len(rest) > 1 else DEFAULT_BRANCH
        if op == "branch" and len(rest) == 2 and cmd in ("POST", "DELETE"):
            return self._branch(repo_type, repo_id, rev, body)
        if op == "refs" and cmd == "GET":
            return self._refs(repo)
        if op == "discussions" and len(rest) == 2 and cmd == "GET":
            return self._discussion(repo, int(rev))
        if op == "commit" and cmd == "POST":
            return self._commit(repo_type, repo_id, rev, body, user)
        if op == "settings" and len(rest) == 1 and cmd == "PUT":
            return self._settings(repo_type, repo_id, json.loads(body or b"{}"))
        commit = self.hub.store.resolve(repo, rev)
        if op == "revision" and cmd == "GET":
            return self._info(repo_type, repo, commit, blobs=self.query.get("blobs") in _TRUE)
        if op == "tree" and cmd == "GET":
            recursive = self.query.get("recursive") in _TRUE
            return self._json(_tree(commit, unquote("/".join(rest[2:])).strip("/"), recursive))
        if op == "paths-info" and cmd == "POST":
            if "json" in self.headers.get("Content-Type", ""):
                paths = json.loads(body or b"{}").get("paths", [])
            else:  # the client posts a form: paths=a&paths=b
                paths = parse_qs(body.decode()).get("paths", [])
            return self._json([e for p in paths for e in _tree(commit, p.strip("/"), stat=True)])
        if op == "commits" and cmd == "GET":
            history: list[dict[str, Any]] = []
            while commit is not None:
                history.append(
                    {
                        "id": commit["id"],
                        "title": commit["title"],
                        "message": commit["message"],
                        "date": commit["date"],
                        "authors": [{"user": commit["author"] or "unknown"}],
                    }
                )
                commit = repo["commits"].get(commit["parent"] or "")
            return self._json(history)
        if op == "preupload" and cmd == "POST":
            return self._preupload(commit, json.loads(body or b"{}"))
        raise HubError(404, f"Not found: /api/{'/'.join(parts)}")

    def _refs(self, repo: dict[str, Any]) -> None:
        """Branches, and with ``include_prs`` the pull requests' refs (named by number, as
        branches and tags are named by their last part)."""
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
            for b, c in repo["refs"].items()
        ]
        refs: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs") in _TRUE:
            refs["pullRequests"] = [
                {"name": n, "ref": f"refs/pr/{n}", "targetCommit": pr["head"]}
                for n, pr in repo.get("prs", {}).items()
            ]
        return self._json(refs)

    def _discussion(self, repo: dict[str, Any], num: int) -> None:
        """A pull request as ``get_discussion_details`` reads it: its base branch, status and
        the commits pushed to it (the double has no comments and no other discussions)."""
        pr = self.hub.store.pr(repo["type"], repo["id"], num)
        commits, head = [], repo["commits"].get(pr["head"])
        while head is not None and head["id"] != pr["start"]:  # the PR's own commits
            commits.append(head)
            head = repo["commits"].get(head["parent"] or "")
        author = {"name": pr["author"] or "unknown"}
        events = [
            {
                "id": c["id"][:24],
                "type": "commit",
                "createdAt": c["date"],
                "author": author,
                "data": {"subject": c["title"], "oid": c["id"]},
            }
            for c in reversed(commits)
        ]
        return self._json(
            {
                "num": num,
                "title": pr["title"],
                "author": author,
                "createdAt": pr["createdAt"],
                "status": pr["status"],
                "repo": {"name": repo["id"], "type": repo["type"]},
                "isPullRequest": True,
                "events": events,
                "changes": {"base": f"refs/heads/{pr['base']}"},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    def _whoami(self) -> None:
        user = self._token_user()
        if user is None:
            raise HubError(401, "Authentication required: send 'Authorization: Bearer <token>'")
        orgs = [
            {"type": "org", "name": o, "fullname": o, "roleInOrg": "admin"} for o in self.hub.orgs
        ]
        token = {"displayName": "hub-double", "role": "read" if self.read_only else "write"}
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _validate_yaml(self, content: str) -> None:
        """The README metadata check a README commit does first; only checks the block is closed."""
        lines = [line.strip() for line in content.splitlines()]
        if lines and lines[0] == "---" and "---" not in lines[1:]:
            error = {"message": "The YAML metadata block is not closed with '---'"}
            return self._json({"errors": [error], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _create_or_delete(self, action: str, payload: dict[str, Any]) -> None:
        user = self._auth(write=True)
        repo_type = payload.get("type") or "model"
        name, org = payload.get("name") or "", payload.get("organization") or user or self.hub.user
        if repo_type not in REPO_TYPES or not re.fullmatch(r"[\w.-]{1,96}", name):
            raise HubError(400, f"Invalid repo type or name: {repo_type} {name!r}")
        if not re.fullmatch(r"[\w.-]{1,96}", org):
            raise HubError(400, f"Invalid namespace: {org!r}")
        repo_id = f"{org}/{name}"
        if action == "delete":
            self.hub.store.delete_repo(repo_type, repo_id)
            return self._json({})
        url = f"{self._base()}/{URL_PREFIX[repo_type]}{repo_id}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        if not self.hub.store.create_repo(repo_type, repo_id, private, author=user or ""):
            message = "You already created this repo"  # the client reads "url" on 409 as well
            return self._json({"error": message, "url": url}, 409, **{"X-Error-Message": message})
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _settings(self, repo_type: str, repo_id: str, payload: dict[str, Any]) -> None:
        """`update_repo_settings`: the visibility (`visibility`, or the older `private`); gating
        is accepted and not modelled. Any accepted token may change any repo (no roles)."""
        visibility = payload.get("visibility")
        if visibility is None and isinstance(payload.get("private"), bool):
            visibility = "private" if payload["private"] else "public"
        if visibility not in (None, "private", "public") or (
            visibility is None and "gated" not in payload
        ):
            raise HubError(400, f"Invalid settings: {sorted(payload)}")
        if visibility is not None:
            self.hub.store.set_private(repo_type, repo_id, visibility == "private")
        return self._json({})

    def _info(
        self, repo_type: str, repo: dict[str, Any], commit: dict[str, Any], blobs: bool
    ) -> None:
        siblings = []
        for path, f in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:  # files_metadata=True
                sibling.update(size=f["size"], blobId=f["oid"])
                if f["lfs"]:
                    pointer_size = len(lfs_pointer(f["sha256"], f["size"]))
                    sibling["lfs"] = {
                        "size": f["size"],
                        "sha256": f["sha256"],
                        "pointerSize": pointer_size,
                    }
            siblings.append(sibling)
        card = self.hub.store.card_data(commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo['id']}".encode()).hexdigest()[:24],
            "id": repo["id"],
            "author": repo["id"].split("/")[0],
            "sha": commit["id"],
            "lastModified": commit["date"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            # The Hub lists a card's license as a tag too.
            "tags": [f"license:{card['license']}"] if card.get("license") else [],
            "siblings": siblings,
            "usedStorage": sum(f["size"] for f in commit["files"].values()),
        }
        if card:
            info["cardData"] = card
        if repo_type == "model" and "config.json" in commit["files"]:
            info["library_name"] = "transformers"
        return self._json(info)

    def _preupload(self, commit: dict[str, Any], payload: dict[str, Any]) -> None:
        """Which files go through LFS; the ``oid`` of a present file lets the client skip it."""
        files = []
        for f in payload.get("files", []):
            existing = commit["files"].get(f["path"])
            oid = existing and (existing["sha256"] if existing["lfs"] else existing["oid"])
            mode = "lfs" if self.hub.store.is_lfs(f["path"], int(f["size"])) else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._json({"files": files, "commitOid": commit["id"]})

    def _branch(self, repo_type: str, repo_id: str, branch: str, body: bytes) -> None:
        """POST creates ``branch`` at the body's ``startingPoint`` (default main); DELETE removes
        it. The answer to both is an empty JSON object, as on the Hub."""
        if self.command == "DELETE":
            self.hub.store.delete_branch(repo_type, repo_id, branch)
        else:
            start = json.loads(body or b"{}").get("startingPoint")
            self.hub.store.create_branch(repo_type, repo_id, branch, start)
        return self._json({})

    def _commit(
        self, repo_type: str, repo_id: str, rev: str, body: bytes, user: str | None
    ) -> None:
        """The NDJSON commit to branch ``rev`` (or pull request ``refs/pr/N``): a header line,
        then file/lfsFile/deletedFile/deletedFolder lines. With ``create_pr=1``, a new pull
        request against branch ``rev`` holds the commit instead."""
        header: dict[str, Any] = {}
        ops: list[tuple[str, str, Any]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                data = (
                    base64.b64decode(content)
                    if value.get("encoding") == "base64"
                    else content.encode()
                )
                ops.append(("file", value["path"], data))
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, "Only sha256 LFS objects are supported")
                size = value.get("size")  # absent when copying an LFS file
                if size is None and self.hub.store.has_blob(value["oid"]):
                    size = self.hub.store.blob_path(value["oid"]).stat().st_size
                ops.append(("lfs", value["path"], (value["oid"], int(size or 0))))
            elif key in ("deletedFile", "deletedFolder"):
                kind = "delete" if key == "deletedFile" else "delete_folder"
                ops.append((kind, value["path"], None))
            else:
                raise HubError(400, f"Unknown commit line key {key!r}")
        message = header.get("summary") or "Upload files"
        description = header.get("description") or ""
        parent = header.get("parentCommit")
        repo_url = f"{self._base()}/{URL_PREFIX[repo_type]}{repo_id}"
        answer: dict[str, Any] = {"success": True, "hookOutput": ""}
        if self.query.get("create_pr") in _TRUE:
            commit_id, num = self.hub.store.open_pr(
                repo_type, repo_id, ops, message, description, parent, user or "", base=rev
            )
            answer["pullRequestUrl"] = f"{repo_url}/discussions/{num}"
        else:
            commit_id = self.hub.store.commit(
                repo_type,
                repo_id,
                ops,
                message,
                description,
                parent,
                author=user or "",
                branch=rev,
            )
        answer.update(commitOid=commit_id, commitUrl=f"{repo_url}/commit/{commit_id}")
        return self._json(answer)

    # -- Git LFS -----------------------------------------------------------------------------------
    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        """LFS batch API, uploads only: an upload href with a one-use ticket per missing object."""
        request = json.loads(body or b"{}")
        if request.get("operation") != "upload":
            raise HubError(400, "The hub double only supports LFS uploads; download via resolve")
        user = self._auth(write=True)
        self._repo(repo_type, repo_id, user)
        objects = []
        for obj in request.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", 0))
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not SHA256_HEX.fullmatch(oid):
                entry["error"] = {"code": 422, "message": "oid must be a sha256 hex digest"}
            elif not self.hub.store.has_blob(oid, size):  # otherwise no actions: already there
                ticket = secrets.token_urlsafe(16)
                with self.hub.store.lock:
                    self.hub.uploads[ticket] = (oid, size)
                href = f"{self._base()}/lfs-upload/{ticket}"
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        payload = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return self._send(200, json.dumps(payload).encode(), None, "application/vnd.git-lfs+json")

    def _lfs_upload(self, ticket: str) -> None:
        """The PUT of one LFS object (the client sends no auth here; the ticket is the credential).

        Stored only if its sha256 and size match what the batch call announced (400 otherwise).
        """
        with self.hub.store.lock:
            expected = self.hub.uploads.pop(ticket, None)
        if expected is None:
            raise HubError(403, "Unknown or already used LFS upload ticket")
        sha, size = expected
        digest, written = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.hub.store.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._iter_body():
                    digest.update(chunk)
                    written += len(chunk)
                    f.write(chunk)
            if (digest.hexdigest(), written) != (sha, size):
                got = f"sha256 {digest.hexdigest()}, {written} bytes"
                raise HubError(
                    400, f"LFS object mismatch: want sha256 {sha}, {size} bytes; got {got}"
                )
            os.replace(tmp, self.hub.store.blob_path(sha))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self._send(200)

    # -- downloads ---------------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        """A file at a revision, with the headers hf_hub_download relies on; HEAD and Range work."""
        repo = self._repo(repo_type, repo_id, self._auth(write=False))
        commit = self.hub.store.resolve(repo, rev)
        headers = {"X-Repo-Commit": commit["id"], "Accept-Ranges": "bytes"}
        f = commit["files"].get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", **headers)
        headers["ETag"] = f'"{f["sha256"] if f["lfs"] else f["oid"]}"'
        if f["lfs"]:
            headers.update({"X-Linked-Etag": headers["ETag"], "X-Linked-Size": str(f["size"])})
        size, start, end, status = f["size"], 0, f["size"] - 1, 200
        if self.headers.get("Range"):
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", self.headers["Range"])
            if match and match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            elif match and match.group(2):
                start = max(size - int(match.group(2)), 0)
            if not match or not any(match.groups()) or start >= size or start > end:
                raise HubError(
                    416, "Range not satisfiable", **headers, **{"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header(
            "Content-Disposition", f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}"
        )
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET":
            with open(self.hub.store.blob_path(f["sha256"]), "rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left > 0 and (chunk := fh.read(min(left, _CHUNK))):
                    self.wfile.write(chunk)
                    left -= len(chunk)
        self._log(status)


def _tree(
    commit: dict[str, Any], path: str, recursive: bool = False, stat: bool = False
) -> list[dict[str, Any]]:
    """Tree entries as the Hub lists them: the children of folder ``path`` (all descendants if
    ``recursive``), or with ``stat`` the entry of ``path`` itself (``[]`` if missing).

    Listing a folder that does not exist is a 404 ``EntryNotFound``, as on the Hub.
    """
    files: dict[str, dict[str, Any]] = commit["files"]

    def file_entry(p: str) -> dict[str, Any]:
        f = files[p]
        entry: dict[str, Any] = {"type": "file", "oid": f["oid"], "size": f["size"], "path": p}
        if f["lfs"]:
            pointer_size = len(lfs_pointer(f["sha256"], f["size"]))
            entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": pointer_size}
        return entry

    def dir_entry(p: str) -> dict[str, Any]:
        inner = sorted((k, v["oid"]) for k, v in files.items() if k.startswith(p + "/"))
        oid = hashlib.sha1(json.dumps(inner).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": p}

    prefix = path + "/" if path else ""
    is_dir = not path or any(k.startswith(prefix) for k in files)
    if stat:
        return [file_entry(path)] if path in files else [dir_entry(path)] if path and is_dir else []
    if not is_dir:
        raise HubError(
            404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit["id"]}
        )
    entries: dict[str, dict[str, Any]] = {}
    for key in sorted(k for k in files if k.startswith(prefix)):
        segments = key[len(prefix) :].split("/")
        for depth in range(1, len(segments) if recursive else min(2, len(segments))):
            folder = prefix + "/".join(segments[:depth])
            entries.setdefault(folder, dir_entry(folder))
        if recursive or len(segments) == 1:
            entries[key] = file_entry(key)
    return list(entries.values())


def _seed_arg(value: str) -> tuple[str, str]:
    name, _, directory = value.partition("=")
    if name.count("/") != 1 or not directory:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME=DIR, got {value!r}")
    return name, directory


def main(argv: list[str] | None = None) -> None:
    """CLI: serve a Hub-API test double until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune_hub_double",
        description="A local Hugging Face Hub-API test double (not a Hub).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    add("--port", type=int, default=8080, help="port; 0 picks a free one (default 8080)")
    add("--root", required=True, help="folder for repos and blobs (created if missing)")
    add("--token", action="append", default=[], help="accepted bearer token (repeatable)")
    add("--token-file", action="append", default=[], help="file of accepted tokens, one a line")
    add("--read-token", action="append", default=[], help="accepted read-only token (repeatable)")
    add("--require-auth-for-read", action="store_true", help="reads need a valid token too")
    add("--user", default="hub-double-user", help="user name whoami-v2 reports")
    add("--org", action="append", default=[], help="org whoami-v2 reports (repeatable)")
    add("--seed-model", action="append", default=[], type=_seed_arg, metavar="NAME=DIR")
    add("--seed-dataset", action="append", default=[], type=_seed_arg, metavar="NAME=DIR")
    add(
        "--test-faults",
        action="store_true",
        default=None,
        help="serve /_test/faults to fail chosen requests (tests only; or HUB_DOUBLE_TEST_FAULTS)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tokens = list(args.token)
    for token_file in args.token_file:
        tokens += [t.strip() for t in Path(token_file).read_text().splitlines() if t.strip()]
    hub = HubDouble(
        args.root,
        args.host,
        args.port,
        tokens,
        args.require_auth_for_read,
        args.user,
        args.org,
        faults=args.test_faults,
        read_tokens=args.read_token,
    )
    for repo_type, seeds in (("model", args.seed_model), ("dataset", args.seed_dataset)):
        for name, directory in seeds:
            log.info("seeded %s %s at %s", repo_type, name, hub.seed(name, directory, repo_type))
    port = hub.start().rsplit(":", 1)[1]
    log.info("hub double serving on %s:%s (auth %s)", args.host, port, "on" if hub.auth else "off")
    try:
        while hub._thread is not None and hub._thread.is_alive():
            hub._thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
