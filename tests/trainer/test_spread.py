"""finetune_trainer.spread on a real gloo process group: 4 processes as 2 pods x 2 ranks, each
pod with its own hub cache. Rank 0 holds a snapshot laid out as huggingface_hub lays it out
(links into blobs); the chunk is 1,000 bytes, so one file crosses in several broadcasts, one in
exactly one, and an empty one in none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import free_ports

pytestmark = pytest.mark.slow

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 9 + b"tail",  # 2,308 bytes: 3 chunks
    "empty.txt": b"",
    "sub/dir/exact.bin": b"x" * 1000,  # one whole chunk
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch.distributed as dist

    from finetune_trainer import fetch, spread

    rank, out = int(os.environ["RANK"]), Path(sys.argv[1])
    files = json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    snap = fetch.Snapshot("model", "org/tiny", sys.argv[3])
    if rank == 0:  # what fetch.download leaves: blobs, links to them, and the mark
        blobs = snap.folder.parents[1] / "blobs"
        blobs.mkdir(parents=True)
        for i, (name, text) in enumerate(files.items()):
            (blobs / str(i)).write_bytes(text.encode("latin-1"))
            (snap.folder / name).parent.mkdir(parents=True, exist_ok=True)
            (snap.folder / name).symlink_to(blobs / str(i))
        snap.mark_complete()
    if rank == 0 and os.environ.get("DIE_AFTER_BROADCASTS"):
        calls, real = [0], dist.broadcast
        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] > int(os.environ["DIE_AFTER_BROADCASTS"]):
                os._exit(3)  # a node lost mid-copy
            return real(*args, **kwargs)
        dist.broadcast = dying
    if rank == 2 and os.environ.get("CACHE_IS_FULL"):  # the kernel's own ENOSPC on every write
        spread._written = lambda path: open("/dev/full", "wb", buffering=0)
    gang = spread.Gang(is_local_main=int(os.environ["LOCAL_RANK"]) == 0, chunk_bytes=1000)
    try:
        gang.share([snap])
    except Exception as exc:
        print(f"share failed: {type(exc).__name__}: {exc}", flush=True)
        raise
    gang.close()
    got = {
        p.relative_to(snap.folder).as_posix(): [p.read_bytes().decode("latin-1"), p.is_symlink()]
        for p in snap.folder.rglob("*") if p.is_file()
    }
    out.write_text(json.dumps({"complete": snap.is_complete(), "files": got}))
    dist.destroy_process_group()
    """
)


def _run_gang(tmp_path: Path, extra_env: dict[str, str] | None = None) -> list[Any]:
    """The 4 ranks; each one's (exit code, report or None, log)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    files = json.dumps({k: v.decode("latin-1") for k, v in FILES.items()})
    (port,) = free_ports(1)
    procs = []
    for rank in range(4):
        env = {
            **os.environ,
            **(extra_env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank % 2),
            "WORLD_SIZE": "4",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            # Pod 0 (ranks 0, 1) and pod 1 (ranks 2, 3), each its own cache.
            "HF_HUB_CACHE": str(tmp_path / f"pod-{rank // 2}" / "hub"),
        }
        out = tmp_path / f"rank-{rank}.json"
        log = (tmp_path / f"rank-{rank}.log").open("w")
        cmd = [sys.executable, str(script), str(out), files, COMMIT]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), out, log))
    results = []
    for proc, out, log in procs:
        code = proc.wait(timeout=120)
        log.close()
        report = json.loads(out.read_text()) if out.exists() else None
        results.append((code, report, Path(log.name).read_text()))
    return results


def test_rank_0_sends_its_snapshot_to_the_pod_whose_cache_lacks_it(tmp_path: Path) -> None:
    results = _run_gang(tmp_path)
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [log for *_, log in results]
    want = {name: text.decode("latin-1") for name, text in FILES.items()}
    for rank, (_, report, _) in enumerate(results):
        assert report["complete"], rank
        assert {name: text for name, (text, _) in report["files"].items()} == want, rank
    # Pod 1 holds plain files (nothing links into a blobs folder it lacks); pod 0 kept its own.
    assert not any(link for _, link in results[2][1]["files"].values())
    assert all(link for _, link in results[0][1]["files"].values())
    assert not (tmp_path / "pod-1" / "hub" / "models--org--tiny" / "blobs").exists()
    # The copy went only to the first rank of pod 1, never to rank 0's own pod-mate.
    marks = tmp_path / "pod-1" / "hub" / ".finetune-fetched"
    assert [p.name for p in marks.iterdir()] == [f"models--org--tiny--{COMMIT}.complete"]


def test_a_sender_lost_mid_copy_fails_the_receivers_at_once_and_leaves_no_copy(
    tmp_path: Path,
) -> None:
    # The files go in path order: config.json (one chunk), empty.txt (none), then
    # model.safetensors, whose first chunk rank 0 never sends.
    results = _run_gang(tmp_path, {"DIE_AFTER_BROADCASTS": "1"})
    codes = [code for code, _, _ in results]
    assert codes[0] == 3 and all(code != 0 for code in codes), codes
    # Within the gang's 120 s above, not the 6-hour timeout: gloo saw its peer go.
    snapshot = tmp_path / "pod-1" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    # Only the files that were whole are there: the part of model.safetensors is removed.
    kept = sorted(p.name for p in snapshot.rglob("*") if p.is_file())
    assert kept == ["config.json", "empty.txt"], kept
    # No mark: the half copy is never loaded, and the next try fetches it again.
    assert not list((tmp_path / "pod-1" / "hub" / ".finetune-fetched").glob("*.complete"))


def test_a_receiving_pod_whose_cache_is_full_fails_naming_the_field_to_raise(
    tmp_path: Path,
) -> None:
    results = _run_gang(tmp_path, {"CACHE_IS_FULL": "1"})
    codes = [code for code, _, _ in results]
    assert all(code != 0 for code in codes), codes
    log = results[2][2]
    assert "share failed: ManifestError" in log, log[-3000:]
    assert "spec.template.cacheSize" in log and "no space left for the model org/tiny" in log
    # Rank 0 is not left sending into the void: gloo fails it once the receiver is gone.
    assert "share failed" in results[0][2], results[0][2][-3000:]
