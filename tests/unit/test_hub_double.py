"""The Hub-API test double, driven by the real huggingface_hub, transformers, peft and datasets.

How clients reach the double: huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` once,
when it is imported, and other tests in the session may have imported it already. So the double
runs in this process (a thread on 127.0.0.1, port 0) and each client scenario runs in a fresh
``python -c`` subprocess whose environment is set before anything is imported (see ``client``).
A scenario gets its inputs as JSON in ``sys.argv[1]`` and prints its results as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_hub_double import HubDouble

TOKEN = "hf_double_good_token_0123456789"
BAD_TOKEN = "hf_double_bad_token_9876543210"
TRAINER_DIR = Path(__file__).resolve().parents[2] / "trainer"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def server_log() -> Iterator[_Lines]:
    handler, logger = _Lines(), logging.getLogger("finetune_hub_double")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, server_log: _Lines) -> Iterator[HubDouble]:
    with HubDouble(tmp_path_factory.mktemp("hub-root"), tokens=[TOKEN]) as double:
        yield double


def client(
    endpoint: str, workdir: Path, code: str, args: Any = None, token: str | None = TOKEN
) -> Any:
    """Run ``code`` in a fresh interpreter pointed at ``endpoint``; return its last JSON line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(workdir / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", textwrap.dedent(code), json.dumps(args)]
    proc = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


ROUNDTRIP = """
    import json, sys
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    folder = json.loads(sys.argv[1])
    api, repo = HfApi(), "org/roundtrip"

    def status(fn):
        try:
            fn()
            return 200
        except HfHubHTTPError as e:
            return e.response.status_code

    first = api.create_repo(repo, private=True, exist_ok=True)
    again = api.create_repo(repo, private=True, exist_ok=True)
    conflict = status(lambda: api.create_repo(repo))
    c1 = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="first")
    info1 = api.model_info(repo, files_metadata=True)
    notes = open(hf_hub_download(repo, "notes.txt")).read()
    big_path = hf_hub_download(repo, "sub/big.dat")
    c2 = api.upload_file(
        path_or_fileobj=b"second version\\n", path_in_repo="notes.txt", repo_id=repo,
        commit_message="second",
    )
    # the parent commit check rejects a commit made on a stale head
    stale = status(lambda: api.upload_file(
        path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, parent_commit=c1.oid
    ))
    snapshot_old = snapshot_download(repo, revision=c1.oid)
    print(json.dumps(dict(
        url=str(first), same_url=str(first) == str(again), conflict=conflict, stale=stale,
        c1=c1.oid, c2=c2.oid, sha1=info1.sha, sha2=api.repo_info(repo).sha,
        lfs={s.rfilename: s.lfs is not None for s in info1.siblings},
        notes=notes, big=big_path,
        old=open(hf_hub_download(repo, "notes.txt", revision=c1.oid)).read(),
        new=open(hf_hub_download(repo, "notes.txt")).read(),
        snapshot_old=open(snapshot_old + "/notes.txt").read(),
        files=sorted(api.list_repo_files(repo)),
        tree=[e.path for e in api.list_repo_tree(repo, "sub")],
        paths=[e.path for e in api.get_paths_info(repo, ["sub", "notes.txt", "missing"])],
        branches=[[b.name, b.target_commit] for b in api.list_repo_refs(repo).branches],
        commits=[c.title for c in api.list_repo_commits(repo)],
        private=api.repo_info(repo).private,
    )))
"""


def test_create_upload_download_and_revisions(hub: HubDouble, tmp_path: Path) -> None:
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("small text file\n")
    big = os.urandom(1_200_000)  # over 1 MB: LFS although the suffix is not a weights one
    (folder / "sub" / "big.dat").write_bytes(big)
    out = client(hub.endpoint, tmp_path / "client", ROUNDTRIP, str(folder))

    assert out["url"] == f"{hub.endpoint}/org/roundtrip" and out["same_url"]
    assert out["conflict"] == 409 and out["stale"] == 412
    assert re.fullmatch(r"[0-9a-f]{40}", out["c1"]) and out["c1"] == out["sha1"]
    assert out["c2"] == out["sha2"] != out["c1"]
    assert out["lfs"] == {".gitattributes": False, "notes.txt": False, "sub/big.dat": True}
    assert out["notes"] == "small text file\n"
    assert Path(out["big"]).read_bytes() == big
    assert (out["old"], out["snapshot_old"]) == ("small text file\n",) * 2
    assert out["new"] == "second version\n"
    assert out["files"] == [".gitattributes", "notes.txt", "sub/big.dat"]
    assert out["tree"] == ["sub/big.dat"]
    assert out["paths"] == ["sub", "notes.txt"]
    assert out["branches"] == [["main", out["c2"]]]
    assert out["commits"] == ["second", "first", "initial commit"]
    assert out["private"] is True

    # Range requests, and the headers hf_hub_download relies on, straight over HTTP
    url = f"{hub.endpoint}/org/roundtrip/resolve/{out['c1']}/sub/big.dat"
    headers = {"Range": "bytes=10-19", "Authorization": f"Bearer {TOKEN}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as resp:
        assert resp.status == 206 and resp.read() == big[10:20]
        assert resp.headers["Content-Range"] == f"bytes 10-19/{len(big)}"
        assert resp.headers["X-Repo-Commit"] == out["c1"]
        assert resp.headers["X-Linked-Etag"] == f'"{hashlib.sha256(big).hexdigest()}"'
        assert resp.headers["X-Linked-Size"] == str(len(big))
    with pytest.raises(urllib.error.HTTPError) as private_repo:  # private: hidden without a token
        urllib.request.urlopen(url)
    assert private_repo.value.code == 404
    assert private_repo.value.headers["X-Error-Code"] == "RepoNotFound"


ERRORS = """
    import json
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    api = HfApi()
    api.create_repo("org/errors", exist_ok=True)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/errors")

    def error(fn):
        try:
            fn()
        except Exception as e:
            return [type(e).__name__, isinstance(e, EntryNotFoundError)]

    print(json.dumps(dict(
        file=error(lambda: hf_hub_download("org/errors", "nope.bin")),
        folder=error(lambda: list(api.list_repo_tree("org/errors", "no/such/folder"))),
        repo=error(lambda: hf_hub_download("org/does-not-exist", "config.json")),
        repo_info=error(lambda: api.model_info("org/does-not-exist")),
        dataset=error(lambda: api.dataset_info("org/errors")),
        revision=error(lambda: hf_hub_download("org/errors", "config.json", revision="nope")),
    )))
"""


def test_errors_surface_as_client_exceptions(
    hub: HubDouble, server_log: _Lines, tmp_path: Path
) -> None:
    out = client(hub.endpoint, tmp_path, ERRORS)
    # Remote*: the server's 404 with X-Error-Code: EntryNotFound, not a connection problem
    assert out["file"] == out["folder"] == ["RemoteEntryNotFoundError", True]
    assert out["repo"] == out["repo_info"] == out["dataset"] == ["RepositoryNotFoundError", False]
    assert out["revision"] == ["RevisionNotFoundError", False]
    assert server_log.lines and not any(TOKEN in line for line in server_log.lines)


def test_lfs_upload_is_verified(hub: HubDouble) -> None:
    hub.store.create_repo("model", "org/lfs-check")
    data = b"payload" * 1000
    oid = hashlib.sha256(data).hexdigest()
    batch_url = f"{hub.endpoint}/org/lfs-check.git/info/lfs/objects/batch"
    batch = {
        "operation": "upload",
        "transfers": ["basic"],
        "hash_algo": "sha256",
        "objects": [{"oid": oid, "size": len(data)}],
    }

    def call(method: str, url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/vnd.git-lfs+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, body, headers, method=method)
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def upload_action() -> dict[str, Any] | None:
        status, body = call("POST", batch_url, json.dumps(batch).encode())
        assert status == 200
        return json.loads(body)["objects"][0].get("actions")

    assert call("POST", batch_url, json.dumps(batch).encode(), token=None)[0] == 401
    action = upload_action()
    assert action is not None
    assert call("PUT", action["upload"]["href"], data[:-1] + b"X")[0] == 400  # sha256 mismatch
    assert not hub.store.has_blob(oid)
    action = upload_action()
    assert action is not None
    assert call("PUT", action["upload"]["href"], data)[0] == 200 and hub.store.has_blob(oid)
    assert call("PUT", action["upload"]["href"], data)[0] == 403  # a ticket is good for one upload
    assert upload_action() is None  # already stored: nothing to upload


TRANSFORMERS_PEFT = """
    import json, torch
    from huggingface_hub import HfApi
    from peft import LoraConfig, PeftModel, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformers import PreTrainedTokenizerFast
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    commit = model.push_to_hub("org/tiny-gpt2", private=True)
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]"] + [f"w{i}" for i in range(98)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").push_to_hub(
        "org/tiny-gpt2"
    )
    sha = HfApi().model_info("org/tiny-gpt2").sha
    back = AutoModelForCausalLM.from_pretrained("org/tiny-gpt2", revision=sha).eval()
    tokenizer = AutoTokenizer.from_pretrained("org/tiny-gpt2")
    ids = torch.tensor([[1, 5, 7, 42, 99]])
    with torch.no_grad():
        diff = (model(ids).logits - back(ids).logits).abs().max().item()
    lora_config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    lora = get_peft_model(model, lora_config).eval()  # injects LoRA layers into `model`
    lora.push_to_hub("org/tiny-gpt2-lora")
    base = AutoModelForCausalLM.from_pretrained("org/tiny-gpt2", revision=sha)
    adapter = PeftModel.from_pretrained(base, "org/tiny-gpt2-lora").eval()
    with torch.no_grad():
        lora_diff = (lora(ids).logits - adapter(ids).logits).abs().max().item()
        lora_effect = (lora(ids).logits - back(ids).logits).abs().max().item()
    print(json.dumps(dict(
        diff=diff, lora_diff=lora_diff, lora_effect=lora_effect, commit=commit.oid, head=sha,
        files=HfApi().list_repo_files("org/tiny-gpt2"),
        lora_files=HfApi().list_repo_files("org/tiny-gpt2-lora"),
        ids=tokenizer("w1 w2 w3")["input_ids"],
    )))
"""


def test_transformers_and_peft_push_and_from_pretrained(hub: HubDouble, tmp_path: Path) -> None:
    out = client(hub.endpoint, tmp_path, TRANSFORMERS_PEFT)
    assert out["diff"] == 0.0
    assert out["lora_diff"] == 0.0 and out["lora_effect"] > 0  # the adapter changes the outputs
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(out["files"])
    assert "adapter_model.safetensors" in out["lora_files"]
    assert out["ids"] == [3, 4, 5]
    assert re.fullmatch(r"[0-9a-f]{40}", out["commit"]) and out["head"] != out["commit"]
    repo = hub.store.get("model", "org/tiny-gpt2")
    assert repo["commits"][out["head"]]["files"]["model.safetensors"]["lfs"] is True


DATASETS = """
    import json, sys
    import datasets
    from datasets import Dataset, load_dataset
    from huggingface_hub import HfApi
    datasets.disable_progress_bars()
    api = HfApi()
    api.create_repo("org/jsonl-data", repo_type="dataset", exist_ok=True)
    api.upload_file(
        path_or_fileobj=json.loads(sys.argv[1]), path_in_repo="data/train.jsonl",
        repo_id="org/jsonl-data", repo_type="dataset",
    )
    from_jsonl = load_dataset("org/jsonl-data", split="train")
    Dataset.from_list(from_jsonl.to_list()).push_to_hub("org/parquet-data", private=True)
    from_parquet = load_dataset("org/parquet-data")
    info = api.dataset_info("org/parquet-data", files_metadata=True)
    print(json.dumps(dict(
        jsonl_rows=from_jsonl.to_list(), parquet_rows=from_parquet["train"].to_list(),
        files=[s.rfilename for s in info.siblings],
        lfs=[s.rfilename for s in info.siblings if s.lfs],
    )))
"""


def test_datasets_push_and_load_dataset(hub: HubDouble, tmp_path: Path) -> None:
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(20)]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = client(hub.endpoint, tmp_path / "client", DATASETS, str(jsonl))
    assert out["jsonl_rows"] == rows
    assert out["parquet_rows"] == rows
    parquet = [f for f in out["files"] if f.endswith(".parquet")]
    assert parquet and set(parquet) <= set(out["lfs"])  # parquet goes through LFS


AUTH = """
    import json
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()

    def status(fn):
        try:
            fn()
            return 200
        except HfHubHTTPError as e:
            return e.response.status_code
        except Exception as e:  # e.g. whoami() with no token at all fails in the client
            return type(e).__name__

    print(json.dumps(dict(
        whoami=status(api.whoami),
        upload=status(lambda: api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/seeded"
        )),
        create=status(lambda: api.create_repo("org/new-repo")),
        read=status(lambda: hf_hub_download("org/seeded", "config.json")),
    )))
"""


def test_cli_auth_and_token_never_logged(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "config.json").write_text('{"seeded": true}')
    pythonpath = os.pathsep.join(p for p in (str(TRAINER_DIR), os.environ.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "finetune_hub_double",
        "--port",
        "0",
        "--root",
        str(tmp_path / "root"),
        "--token",
        TOKEN,
        "--seed-model",
        f"org/seeded={seed}",
    ]
    server = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert server.stderr is not None
        deadline = time.monotonic() + 60
        while not (match := re.search(r"serving on [\d.]+:(\d+)", "".join(lines))):
            assert time.monotonic() < deadline and server.poll() is None, "".join(lines)
            lines.append(server.stderr.readline())
        endpoint = f"http://127.0.0.1:{match.group(1)}"
        results = {
            name: client(endpoint, tmp_path / name, AUTH, token=token)
            for name, token in (("bad", BAD_TOKEN), ("anonymous", None), ("good", TOKEN))
        }
    finally:
        server.terminate()
        lines.append(server.communicate(timeout=30)[1])
    assert results["bad"] == {"whoami": 401, "upload": 401, "create": 401, "read": 401}
    assert results["anonymous"] == {
        "whoami": "LocalTokenNotFoundError",
        "upload": 401,
        "create": 401,
        "read": 200,
    }
    assert results["good"] == {"whoami": 200, "upload": 200, "create": 200, "read": 200}
    log_text = "".join(lines)
    assert "GET /api/whoami-v2 401" in log_text and "seeded model org/seeded" in log_text
    assert TOKEN not in log_text and BAD_TOKEN not in log_text


def _call(
    method: str, url: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request; JSON bodies both ways. Returns the status, the JSON answer and the headers."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            raw, status, answer_headers = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, answer_headers = e.read(), e.code, dict(e.headers)
    return status, json.loads(raw) if raw.strip() else {}, answer_headers


def test_faults_are_off_unless_asked_for(hub: HubDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.faults is None
    status, _, _ = _call("POST", f"{hub.endpoint}/_test/faults", {"kind": "any", "status": 503})
    assert status == 404
    assert _call("GET", f"{hub.endpoint}/api/whoami-v2")[0] == 200  # nothing was injected
    monkeypatch.setenv("HUB_DOUBLE_TEST_FAULTS", "1")
    assert HubDouble(hub.store.root).faults is not None  # the env turns them on


def test_faults_fail_the_next_requests_of_a_kind(tmp_path: Path) -> None:
    with HubDouble(tmp_path / "root", tokens=[TOKEN], faults=True) as double:
        faults, api = f"{double.endpoint}/_test/faults", f"{double.endpoint}/api"
        double.store.create_repo("model", "org/faulty")
        commit = f"{api}/models/org/faulty/commit/main"
        line = {"key": "file", "value": {"path": "a.txt", "content": "a", "encoding": "utf-8"}}
        ndjson = (json.dumps({"key": "header", "value": {"summary": "s"}}) + "\n").encode()
        ndjson += json.dumps(line).encode()

        status, state, _ = _call("POST", faults, {"kind": "commit", "status": 503, "count": 2})
        assert status == 200 and state["pending"] == [{"kind": "commit", "status": 503, "count": 2}]
        assert _call("GET", f"{api}/models/org/faulty")[0] == 200  # other kinds pass
        for _ in range(2):
            status, body, headers = _call("POST", commit, ndjson)
            assert status == 503 and "Injected" in headers["X-Error-Message"]
        status, body, _ = _call("POST", commit, ndjson)
        assert status == 200 and body["success"]
        assert _call("GET", faults)[1] == {"pending": [], "fired": {"commit": 2}}

        # `any` hits every route; DELETE forgets pending faults and counts.
        _call("POST", faults, {"kind": "any", "status": 500, "count": 5})
        assert _call("GET", f"{api}/models/org/faulty")[0] == 500
        assert _call("DELETE", faults)[1] == {"pending": [], "fired": {}}
        assert _call("GET", f"{api}/models/org/faulty")[0] == 200

        # Malformed orders are refused and change nothing.
        for order in ({"kind": "push"}, {"status": 200}, {"count": 0}, {"count": "3"}, [1]):
            assert _call("POST", faults, order)[0] == 400, order
        assert _call("GET", faults)[1]["pending"] == []

        # In process, the same: an LFS upload that fails keeps its ticket for the retry.
        data = b"lfs" * 100
        oid = hashlib.sha256(data).hexdigest()
        batch = {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}
        lfs = f"{double.endpoint}/org/faulty.git/info/lfs/objects/batch"
        status, body, _ = _call("POST", lfs, batch)
        href = body["objects"][0]["actions"]["upload"]["href"]
        assert double.faults is not None
        double.faults.add("upload", 502)
        assert _call("PUT", href, data, token=None)[0] == 502
        assert _call("PUT", href, data, token=None)[0] == 200 and double.store.has_blob(oid)


def test_faults_scoped_to_a_repo_spare_other_repos(tmp_path: Path) -> None:
    """Concurrent jobs share one double: a fault ordered for one repo is never taken by another
    repo's request, whatever the order they come in."""
    with HubDouble(tmp_path / "root", tokens=[TOKEN], faults=True) as double:
        faults, api = f"{double.endpoint}/_test/faults", f"{double.endpoint}/api"
        for repo in ("org/mine", "org/other"):
            double.store.create_repo("model", repo)
        line = {"key": "file", "value": {"path": "a.txt", "content": "a", "encoding": "utf-8"}}
        ndjson = (json.dumps({"key": "header", "value": {"summary": "s"}}) + "\n").encode()
        ndjson += json.dumps(line).encode()
        order = {"kind": "commit", "status": 503, "count": 2, "repo": "org/mine"}
        status, state, _ = _call("POST", faults, order)
        assert status == 200 and state["pending"] == [order]

        # The other repo's commits (and the scoped repo's other kinds) pass.
        assert _call("POST", f"{api}/models/org/other/commit/main", ndjson)[0] == 200
        assert _call("GET", f"{api}/models/org/mine")[0] == 200
        for _ in range(2):
            assert _call("POST", f"{api}/models/org/mine/commit/main", ndjson)[0] == 503
            assert _call("POST", f"{api}/models/org/other/commit/main", ndjson)[0] == 200
        assert _call("POST", f"{api}/models/org/mine/commit/main", ndjson)[0] == 200
        assert _call("GET", faults)[1] == {
            "pending": [],
            "fired": {"commit": 2},
            "firedByRepo": {"org/mine": {"commit": 2}},
        }

        # create names its repo in the body; a 403 there leaves the repo uncreated.
        create = {"kind": "create", "status": 403, "count": 1, "repo": "org/new"}
        assert _call("POST", faults, create)[0] == 200
        assert (
            _call("POST", f"{api}/repos/create", {"name": "fresh", "organization": "org"})[0] == 200
        )
        assert (
            _call("POST", f"{api}/repos/create", {"name": "new", "organization": "org"})[0] == 403
        )
        assert _call("GET", f"{api}/models/org/new")[0] == 404
        assert (
            _call("POST", f"{api}/repos/create", {"name": "new", "organization": "org"})[0] == 200
        )

        # An unscoped order still matches every repo; a malformed repo is refused.
        _call("POST", faults, {"kind": "commit", "status": 500})
        assert _call("POST", f"{api}/models/org/other/commit/main", ndjson)[0] == 500
        for bad in ({"repo": "no-namespace"}, {"repo": 7}, {"repo": "a/b/c"}):
            assert _call("POST", faults, {"kind": "commit", **bad})[0] == 400, bad


@pytest.mark.parametrize(
    ("method", "path", "body", "repo"),
    [
        ("POST", "api/repos/create", b'{"name": "m", "organization": "org"}', "org/m"),
        ("POST", "api/repos/create", b'{"name": "m"}', None),
        ("POST", "api/repos/create", b"not json", None),
        ("POST", "api/models/org/m/preupload/main", b"", "org/m"),
        ("POST", "api/datasets/org/d/commit/main", b"", "org/d"),
        ("GET", "api/models/org/m", b"", "org/m"),
        ("GET", "api/whoami-v2", b"", None),
        ("POST", "org/m.git/info/lfs/objects/batch", b"", "org/m"),
        ("POST", "datasets/org/d.git/info/lfs/objects/batch", b"", "org/d"),
        ("PUT", "lfs-upload/ticket", b"", None),
        ("GET", "org/m/resolve/main/config.json", b"", "org/m"),
        ("HEAD", "datasets/org/d/resolve/main/a/b.json", b"", "org/d"),
    ],
)
def test_fault_repo_of_requests(method: str, path: str, body: bytes, repo: str | None) -> None:
    from finetune_hub_double.faults import request_repo

    assert request_repo(method, path.split("/"), body) == repo


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "api/repos/create", "create"),
        ("POST", "api/models/org/m/preupload/main", "preupload"),
        ("POST", "api/datasets/org/d/commit/main", "commit"),
        ("POST", "org/m.git/info/lfs/objects/batch", "upload"),
        ("POST", "datasets/org/d.git/info/lfs/objects/batch", "upload"),
        ("PUT", "lfs-upload/ticket", "upload"),
        ("GET", "org/m/resolve/main/config.json", "download"),
        ("HEAD", "datasets/org/d/resolve/main/a/b.json", "download"),
        ("PUT", "api/models/org/m/settings", "settings"),
        ("PUT", "api/datasets/org/d/settings", "settings"),
        ("GET", "api/models/org/m", None),
        ("GET", "api/whoami-v2", None),
    ],
)
def test_fault_kinds_of_requests(method: str, path: str, kind: str | None) -> None:
    from finetune_hub_double.faults import request_kind

    assert request_kind(method, path.split("/")) == kind
