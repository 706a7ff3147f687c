"""Storage for the Hub-API test double (:mod:`finetune_hub_double`).

Storage, under ``root``: content-addressed blobs (``blobs/<sha256>``) and one JSON file per repo
(``repos/<type>s/<namespace>/<name>/repo.json``) holding its branches (``refs``: name -> head
commit, ``main`` first), its pull requests (``prs``: number -> base branch and head commit, on
the ref ``refs/pr/<number>``) and every commit; each commit is an immutable snapshot
``path -> blob`` with a 40-hex id and one parent, so each branch is a linear history. Errors are
raised as :class:`HubError`, which carries the HTTP answer the server sends for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BRANCH",
    "DEFAULT_LFS_THRESHOLD",
    "GITATTRIBUTES",
    "LFS_SUFFIXES",
    "SHA256_HEX",
    "HubError",
    "Store",
    "branch_name",
    "git_blob_oid",
    "lfs_pointer",
    "pr_number",
]

_LFS_SUFFIXES = ".safetensors .bin .parquet .arrow .pt .pth .ckpt .h5 .onnx .gguf .msgpack .pkl"
LFS_SUFFIXES = tuple(
    f"{_LFS_SUFFIXES} .pickle .npy .npz .zip .gz .bz2 .xz .zst .tar .model".split()
)
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
DEFAULT_LFS_THRESHOLD = 1_000_000  # bytes; bigger files are uploaded through LFS
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
# A flat `key: value` line of a model card's front matter (a scalar, not a list or a map), and
# a trailing comment.
_CARD_SCALAR = re.compile(
    r"(?P<key>[A-Za-z_][\w-]*):[ \t]+(?P<value>[^\s\[{#|>&*!].*?)(?:[ \t]+#.*)?"
)
# Git's ref rules, narrowed: segments of word characters, dots and dashes, no "..", no ".lock".
_BRANCH = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*")
DEFAULT_BRANCH = "main"
# The git ref of a pull request, as the Hub names it.
_PR_REF = re.compile(r"refs/pr/([1-9][0-9]*)")


class HubError(Exception):
    """An error answer: HTTP ``status``, and ``code`` for ``X-Error-Code`` (e.g. EntryNotFound)."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def git_blob_oid(data: bytes) -> str:
    """Git's blob id, sha1 of ``blob <size>\\0<data>``: what the Hub reports as a file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in the repo for an LFS object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def branch_name(revision: str) -> str:
    """The branch a revision names (``refs/heads/main`` -> ``main``); else unchanged."""
    return revision.removeprefix("refs/heads/")


def pr_number(revision: str) -> int | None:
    """The pull request a revision names (``refs/pr/3`` -> 3); None for anything else."""
    match = _PR_REF.fullmatch(revision)
    return int(match[1]) if match else None


class Store:
    """Repos and blobs on disk. Writes hold ``lock``; a repo dict is replaced, never mutated."""

    def __init__(self, root: str | os.PathLike[str], lfs_threshold: int = DEFAULT_LFS_THRESHOLD):
        self.root = Path(root)
        self.lfs_threshold = lfs_threshold
        for sub in ("blobs", "tmp", "repos"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._repos: dict[tuple[str, str], dict[str, Any]] = {}

    def is_lfs(self, path: str, size: int) -> bool:
        """Upload-mode policy: weights/data suffixes and files over ``lfs_threshold`` use LFS."""
        return size > 0 and (path.lower().endswith(LFS_SUFFIXES) or size > self.lfs_threshold)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return (
            bool(SHA256_HEX.fullmatch(sha256))
            and path.is_file()
            and (size is None or path.stat().st_size == size)
        )

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.blob_path(sha))
        return sha

    def _meta_path(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id / "repo.json"

    def get(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        """The repo record; 404 ``RepoNotFound`` if there is none."""
        with self.lock:
            if (repo_type, repo_id) not in self._repos:
                path = self._meta_path(repo_type, repo_id)
                if not path.is_file():
                    raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
                self._repos[(repo_type, repo_id)] = json.loads(path.read_text())
            return self._repos[(repo_type, repo_id)]

    def exists(self, repo_type: str, repo_id: str) -> bool:
        try:
            return bool(self.get(repo_type, repo_id))
        except HubError:
            return False

    def _save(self, repo: dict[str, Any]) -> None:
        path = self._meta_path(repo["type"], repo["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(repo))
        os.replace(path.with_suffix(".tmp"), path)
        self._repos[(repo["type"], repo["id"])] = repo

    def create_repo(
        self, repo_type: str, repo_id: str, private: bool = False, author: str = ""
    ) -> bool:
        """Create a repo with an initial ``.gitattributes`` commit; False if it exists already.

        The initial commit matters: ``ModelCard.load`` and ``push_to_hub`` fail on an empty repo.
        """
        with self.lock:
            if self.exists(repo_type, repo_id):
                return False
            self._save(
                {
                    "id": repo_id,
                    "type": repo_type,
                    "private": private,
                    "createdAt": _now(),
                    "refs": {},
                    "commits": {},
                }
            )
            ops = [("file", ".gitattributes", GITATTRIBUTES.encode())]
            self.commit(repo_type, repo_id, ops, "initial commit", author=author)
            return True

    def set_private(self, repo_type: str, repo_id: str, private: bool) -> None:
        """Change a repo's visibility (the settings call); 404 if there is no such repo."""
        with self.lock:
            self._save({**self.get(repo_type, repo_id), "private": private})

    def card_data(self, commit: dict[str, Any]) -> dict[str, str]:
        """The top-level `key: value` scalars of README.md's YAML front matter at `commit`, as
        the Hub serves them in `cardData` (only flat scalars: the double parses no YAML)."""
        entry = commit["files"].get("README.md")
        if entry is None or not self.has_blob(entry["sha256"]):
            return {}
        lines = self.blob_path(entry["sha256"]).read_text(errors="replace").splitlines()
        if not lines or lines[0].strip() != "---":
            return {}
        data: dict[str, str] = {}
        for line in lines[1:]:
            if line.strip() == "---":
                return data
            match = _CARD_SCALAR.fullmatch(line)
            if match:
                data[match["key"]] = match["value"].strip().strip("'\"")
        return {}  # the block is not closed: no metadata, as on the Hub

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.get(repo_type, repo_id)
            shutil.rmtree(self._meta_path(repo_type, repo_id).parent)
            self._repos.pop((repo_type, repo_id), None)

    def create_branch(
        self, repo_type: str, repo_id: str, branch: str, starting_point: str | None = None
    ) -> str:
        """Create ``branch`` at ``starting_point`` (a branch or commit; default the head of
        ``main``) and return its head. 409 if it exists, 400 for a name git would refuse."""
        branch = branch_name(branch)
        if (
            not _BRANCH.fullmatch(branch)
            or ".." in branch
            or branch.endswith(".lock")
            or branch.startswith("refs/")
            or _SHA1.fullmatch(branch)
        ):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        with self.lock:
            repo = self.get(repo_type, repo_id)
            if branch in repo["refs"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            head = self.resolve(repo, starting_point or DEFAULT_BRANCH)["id"]
            self._save({**repo, "refs": {**repo["refs"], branch: head}})
            return str(head)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        """Delete ``branch``; its commits stay reachable by id. 403 for ``main``, 404 if absent."""
        branch = branch_name(branch)
        with self.lock:
            repo = self.get(repo_type, repo_id)
            if branch == DEFAULT_BRANCH:
                raise HubError(403, f"Cannot delete the default branch {DEFAULT_BRANCH}")
            if branch not in repo["refs"]:
                raise HubError(404, f"Branch not found: {branch}", "RevisionNotFound")
            self._save({**repo, "refs": {k: v for k, v in repo["refs"].items() if k != branch}})

    def resolve(self, repo: dict[str, Any], revision: str) -> dict[str, Any]:
        """The commit a branch name (``main``, ``refs/heads/main``), a pull request's ref
        (``refs/pr/1``) or a full commit id names."""
        commits: dict[str, dict[str, Any]] = repo["commits"]
        if branch_name(revision) in repo["refs"]:
            return commits[repo["refs"][branch_name(revision)]]
        pr = repo.get("prs", {}).get(str(pr_number(revision)))
        if pr is not None:
            return commits[pr["head"]]
        if _SHA1.fullmatch(revision) and revision in commits:
            return commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        ops: Iterable[tuple[str, str, Any]],
        title: str,
        description: str = "",
        parent: str | None = None,
        author: str = "",
        branch: str = DEFAULT_BRANCH,
    ) -> str:
        """Apply ``ops`` to the head of ``branch`` (or of the pull request ``refs/pr/N``) as one
        new commit and return its id.

        Ops: ``("file", path, bytes)``, ``("lfs", path, (sha256, size))`` for an uploaded LFS
        object, ``("delete", path, None)``, ``("delete_folder", path, None)``. ``parent``, if
        given, must be the current head (412 otherwise). A branch that does not exist is a 404
        (as on the Hub: commits go to existing branches only), except ``main`` of a new repo.
        """
        branch = branch_name(branch)
        with self.lock:
            repo = self.get(repo_type, repo_id)
            num = pr_number(branch)
            if num is not None:
                head_id: str | None = self._pr(repo, num)["head"]
            elif repo["refs"] and branch not in repo["refs"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            else:
                head_id = repo["refs"].get(branch)
            if parent is not None and parent != head_id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit = self._snapshot(repo, head_id, ops, title, description, author)
            commits = {**repo["commits"], commit["id"]: commit}
            if num is None:
                self._save(
                    {**repo, "commits": commits, "refs": {**repo["refs"], branch: commit["id"]}}
                )
            else:
                prs = repo["prs"]
                prs = {**prs, str(num): {**prs[str(num)], "head": commit["id"]}}
                self._save({**repo, "commits": commits, "prs": prs})
            return str(commit["id"])

    def open_pr(
        self,
        repo_type: str,
        repo_id: str,
        ops: Iterable[tuple[str, str, Any]],
        title: str,
        description: str = "",
        parent: str | None = None,
        author: str = "",
        base: str = DEFAULT_BRANCH,
    ) -> tuple[str, int]:
        """Open a pull request against branch ``base`` whose one commit applies ``ops`` on top
        of ``parent`` (a commit id; default ``base``'s head), as a commit with ``create_pr=1``
        does on the Hub. Returns the commit id and the pull request's number (``refs/pr/N``);
        ``base`` itself does not move. 404 for a base that is not a branch."""
        base = branch_name(base)
        with self.lock:
            repo = self.get(repo_type, repo_id)
            if base not in repo["refs"]:
                raise HubError(404, f"Invalid rev id: {base}", "RevisionNotFound")
            start = parent or repo["refs"][base]
            if start not in repo["commits"]:
                raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            commit = self._snapshot(repo, start, ops, title, description, author)
            prs = repo.get("prs", {})
            # The Hub numbers discussions and pull requests together; the double has only PRs.
            num = len(prs) + 1
            pr = {
                "num": num,
                "title": title,
                "description": description,
                "author": author,
                "base": base,
                "start": start,  # the commit the pull request's own commits sit on
                "head": commit["id"],
                "createdAt": commit["date"],
                "status": "open",
            }
            commits = {**repo["commits"], commit["id"]: commit}
            self._save({**repo, "commits": commits, "prs": {**prs, str(num): pr}})
            return str(commit["id"]), num

    def pr(self, repo_type: str, repo_id: str, num: int) -> dict[str, Any]:
        """Pull request ``num`` of the repo; 404 if there is none."""
        with self.lock:
            return self._pr(self.get(repo_type, repo_id), num)

    @staticmethod
    def _pr(repo: dict[str, Any], num: int) -> dict[str, Any]:
        pr = repo.get("prs", {}).get(str(num))
        if pr is None:
            raise HubError(404, f"Discussion {num} not found", "RevisionNotFound")
        return dict(pr)

    def _snapshot(
        self,
        repo: dict[str, Any],
        head_id: str | None,
        ops: Iterable[tuple[str, str, Any]],
        title: str,
        description: str,
        author: str,
    ) -> dict[str, Any]:
        """A new commit: ``ops`` applied to the files of ``head_id`` (its parent). Not saved."""
        files: dict[str, dict[str, Any]] = (
            dict(repo["commits"][head_id]["files"]) if head_id else {}
        )
        for kind, path, payload in ops:
            path = path.strip("/")
            if not path or ".." in path.split("/") or "\\" in path:
                raise HubError(400, f"Invalid path: {path!r}")
            if kind == "file":
                files[path] = {
                    "sha256": self.put_blob(payload),
                    "size": len(payload),
                    "oid": git_blob_oid(payload),
                    "lfs": False,
                }
            elif kind == "lfs":
                sha, size = payload
                if not self.has_blob(sha, size):
                    raise HubError(422, f"LFS object {sha} ({size} bytes) was not uploaded")
                oid = git_blob_oid(lfs_pointer(sha, size))
                files[path] = {"sha256": sha, "size": size, "oid": oid, "lfs": True}
            elif kind == "delete" and files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif kind == "delete_folder":
                gone = [p for p in files if p.startswith(path + "/")]
                if not gone:
                    raise HubError(404, f"No folder {path} in the repo", "EntryNotFound")
                for p in gone:
                    del files[p]
            elif kind not in ("file", "lfs", "delete", "delete_folder"):
                raise HubError(400, f"Unknown commit operation {kind!r}")
        date = _now()
        seed = json.dumps([repo["id"], head_id, files, title, date, secrets.token_hex(8)])
        return {
            "id": hashlib.sha1(seed.encode()).hexdigest(),
            "parent": head_id,
            "title": title,
            "message": description,
            "date": date,
            "author": author,
            "files": files,
        }

    def seed(self, repo_type: str, repo_id: str, directory: str | os.PathLike[str]) -> str:
        """Create ``repo_id`` if needed and commit the files of ``directory`` that differ.

        Idempotent: returns the head commit id, unchanged when nothing differs.
        """
        base = Path(directory)
        if not base.is_dir():
            raise ValueError(f"seed directory {base} does not exist")
        with self.lock:
            self.create_repo(repo_type, repo_id)
            repo = self.get(repo_type, repo_id)
            head = repo["commits"][repo["refs"][DEFAULT_BRANCH]]
            ops: list[tuple[str, str, Any]] = []
            for path in sorted(p for p in base.rglob("*") if p.is_file() and ".git" not in p.parts):
                rel, data = path.relative_to(base).as_posix(), path.read_bytes()
                current = head["files"].get(rel)
                if current is None or current["sha256"] != hashlib.sha256(data).hexdigest():
                    if self.is_lfs(rel, len(data)):
                        ops.append(("lfs", rel, (self.put_blob(data), len(data))))
                    else:
                        ops.append(("file", rel, data))
            if not ops:
                return str(head["id"])
            return self.commit(repo_type, repo_id, ops, f"Seed from {base.name}")
