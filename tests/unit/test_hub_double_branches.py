"""Branches on the Hub-API test double, driven by the real huggingface_hub client.

The client runs in this process with the double's endpoint passed to `HfApi` explicitly (the
module-level endpoint was fixed when huggingface_hub was first imported); offline mode and Xet,
which huggingface_hub also reads at import, are patched off for each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_hub_double import HubDouble

TOKEN = "hf_branches_good_token_0123456789"
REPO = "org/branches"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDouble]:
    with HubDouble(tmp_path / "hub-root", tokens=[TOKEN], lfs_threshold=1000) as double:
        yield double


@pytest.fixture
def api(hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _status(fn: Any) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        fn()
    except HfHubHTTPError as exc:
        return exc.response.status_code
    return 200


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_branch_lifecycle_commits_and_reads(api: Any, tmp_path: Path) -> None:
    from huggingface_hub.errors import RevisionNotFoundError

    api.create_repo(REPO, private=True)
    main_head = api.upload_file(path_or_fileobj=b"on main\n", path_in_repo="a.txt", repo_id=REPO)

    # A commit to a branch that does not exist fails: the client must create it first.
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="ck")

    api.create_branch(REPO, branch="ck")
    api.create_branch(REPO, branch="ck", exist_ok=True)  # 409, taken as success
    assert _status(lambda: api.create_branch(REPO, branch="ck")) == 409
    assert _status(lambda: api.create_branch(REPO, branch="bad..name")) == 400
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert refs == {"main": main_head.oid, "ck": main_head.oid}  # starts at main's head

    # upload_folder with delete_patterns on the branch: one commit, through LFS for weights.
    first = _folder(tmp_path / "one", {"w.safetensors": b"1" * 2000, "state.json": b"{}"})
    c1 = api.upload_folder(
        repo_id=REPO, folder_path=first, path_in_repo="last", revision="ck", commit_message="s1"
    )
    second = _folder(tmp_path / "two", {"w.safetensors": b"2" * 2000, "new.txt": b"new"})
    c2 = api.upload_folder(
        repo_id=REPO,
        folder_path=second,
        path_in_repo="last",
        revision="ck",
        delete_patterns="*",
        commit_message="s2",
    )
    assert c1.oid != c2.oid
    branch_files = api.list_repo_files(REPO, revision="ck")
    assert sorted(branch_files) == [".gitattributes", "a.txt", "last/new.txt", "last/w.safetensors"]
    # main is untouched by commits to the branch.
    assert api.list_repo_files(REPO) == [".gitattributes", "a.txt"]
    assert api.repo_info(REPO).sha == main_head.oid
    assert api.repo_info(REPO, revision="ck").sha == c2.oid
    assert [c.title for c in api.list_repo_commits(REPO, revision="ck")][:2] == ["s2", "s1"]
    assert [e.path for e in api.list_repo_tree(REPO, "last", revision="ck")] == [
        "last/new.txt",
        "last/w.safetensors",
    ]
    assert [e.path for e in api.get_paths_info(REPO, ["last/new.txt"], revision="ck")] == [
        "last/new.txt"
    ]

    # snapshot_download of the branch, limited to the folder; and of the first commit by id.
    got = Path(api.snapshot_download(REPO, revision="ck", allow_patterns=["last/*"]))
    assert sorted(p.name for p in (got / "last").iterdir()) == ["new.txt", "w.safetensors"]
    assert (got / "last" / "w.safetensors").read_bytes() == b"2" * 2000
    assert not (got / "a.txt").exists()
    old = Path(api.snapshot_download(REPO, revision=c1.oid, local_dir=tmp_path / "old"))
    assert (old / "last" / "w.safetensors").read_bytes() == b"1" * 2000
    assert api.hf_hub_download(REPO, "last/new.txt", revision="refs/heads/ck")

    # A branch from another starting point; deletion; main cannot be deleted.
    api.create_branch(REPO, branch="from-first", revision=c1.oid)
    assert api.repo_info(REPO, revision="from-first").sha == c1.oid
    api.delete_branch(REPO, branch="ck")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main", "from-first"]
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="ck")
    assert _status(lambda: api.delete_branch(REPO, branch="ck")) == 404
    assert _status(lambda: api.delete_branch(REPO, branch="main")) == 403
    # The commits of a deleted branch stay readable by id.
    assert api.repo_info(REPO, revision=c2.oid).sha == c2.oid


def test_branches_need_a_valid_token(hub: HubDouble, api: Any) -> None:
    from huggingface_hub import HfApi

    api.create_repo(REPO, private=False)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    wrong = HfApi(endpoint=hub.endpoint, token="hf_not_the_right_token_000000")
    assert _status(lambda: anonymous.create_branch(REPO, branch="ck")) == 401
    assert _status(lambda: wrong.create_branch(REPO, branch="ck")) == 401
    api.create_branch(REPO, branch="ck")
    assert _status(lambda: anonymous.delete_branch(REPO, branch="ck")) == 401
    # Reading a public repo's branch needs no token.
    assert [b.name for b in anonymous.list_repo_refs(REPO).branches] == ["main", "ck"]


# ---- pull requests: a commit with create_pr=1, as on the Hub -------------------------------


def test_create_pr_opens_a_pull_request_and_leaves_main(api: Any, tmp_path: Path) -> None:
    api.create_repo(REPO)
    main_head = api.upload_file(path_or_fileobj=b"on main\n", path_in_repo="a.txt", repo_id=REPO)
    folder = _folder(tmp_path / "pr", {"w.safetensors": b"3" * 2000, "a.txt": b"changed\n"})

    first = api.upload_folder(repo_id=REPO, folder_path=folder, create_pr=True, commit_message="p")
    assert (first.pr_revision, first.pr_num) == ("refs/pr/1", 1)
    assert first.pr_url.endswith(f"/{REPO}/discussions/1")
    # main has not moved; the pull request's ref holds the commit, on top of main.
    assert api.repo_info(REPO).sha == main_head.oid
    assert api.repo_info(REPO, revision="refs/pr/1").sha == first.oid
    got = Path(api.hf_hub_download(REPO, "a.txt", revision="refs/pr/1"))
    assert got.read_bytes() == b"changed\n"
    assert sorted(api.list_repo_files(REPO, revision="refs/pr/1")) == [
        ".gitattributes",
        "a.txt",
        "w.safetensors",
    ]
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", first.oid)]
    assert [b.name for b in refs.branches] == ["main"]  # a PR is no branch

    # A commit to refs/pr/1 adds to that pull request; create_pr again opens another.
    more = api.upload_file(
        path_or_fileobj=b"more", path_in_repo="b.txt", repo_id=REPO, revision="refs/pr/1"
    )
    assert more.pr_url is None and api.repo_info(REPO, revision="refs/pr/1").sha == more.oid
    second = api.upload_file(
        path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, create_pr=True
    )
    assert second.pr_revision == "refs/pr/2"

    details = api.get_discussion_details(REPO, 1)
    assert details.is_pull_request and details.status == "open"
    assert (details.target_branch, details.git_reference) == ("refs/heads/main", "refs/pr/1")
    assert [e.oid for e in details.events if e.type == "commit"] == [first.oid, more.oid]
    assert api.repo_info(REPO).sha == main_head.oid


def test_a_pull_request_against_a_branch_and_missing_ones(api: Any) -> None:
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api.create_repo(REPO)
    api.create_branch(REPO, branch="dev")

    def add() -> list[Any]:  # an operation is spent once committed
        return [CommitOperationAdd(path_in_repo="d.txt", path_or_fileobj=b"d")]

    # The Hub's commit API opens a PR against the branch committed to (create_commit does it;
    # upload_folder refuses create_pr with another revision).
    info = api.create_commit(REPO, add(), commit_message="to dev", revision="dev", create_pr=True)
    assert api.get_discussion_details(REPO, info.pr_num).target_branch == "refs/heads/dev"
    assert api.list_repo_files(REPO, revision="dev") == [".gitattributes"]
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(REPO, add(), commit_message="x", revision="nope", create_pr=True)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="refs/pr/9")
    with pytest.raises(HfHubHTTPError):
        api.get_discussion_details(REPO, 9)


def test_read_tokens_read_but_never_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    read = "hf_branches_read_only_token_0123"
    with HubDouble(
        tmp_path / "root", tokens={TOKEN: "writer"}, read_tokens={read: "reader"}
    ) as hub:
        writer = HfApi(endpoint=hub.endpoint, token=TOKEN)
        reader = HfApi(endpoint=hub.endpoint, token=read)
        writer.create_repo(REPO, private=True)
        hub.requests.clear()
        assert reader.repo_info(REPO).private is True  # a private repo: the token was taken
        assert reader.whoami()["auth"]["accessToken"]["role"] == "read"
        assert _status(lambda: reader.create_branch(REPO, branch="ck")) == 403
        assert _status(lambda: reader.create_repo("org/other")) == 403
        upload = lambda: reader.upload_file(  # noqa: E731
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO
        )
        assert _status(upload) == 403
        writer.create_branch(REPO, branch="ck")
        # Who asked for what, by user: never the token itself.
        assert ("GET", f"/api/models/{REPO}", "reader") in hub.requests
        assert ("POST", f"/api/models/{REPO}/branch/ck", "writer") in hub.requests
        assert not [r for r in hub.requests if read in str(r) or TOKEN in str(r)]
