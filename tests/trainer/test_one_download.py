"""One download per job, counted in the Hub double's request log: real gangs of `finetune train`
processes (2 pods x 2 ranks, each pod with its own HF_HOME, as each has its own /tmp emptyDir)
loading an hf:// model and dataset from the double.

With the hub cache on the checkpoint volume (HF_HUB_CACHE, as the operator renders it for a job
with a claim), two attempts of the gang download each file once in all. Without it, rank 0
downloads each file once and sends it to the other pod over the gang's network
(finetune_trainer.spread). The second attempt also loads the commits the first resolved,
although the branch has moved on meanwhile."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import Gang, deep_update

from finetune_api import pod
from finetune_api.pod import ExitCode
from finetune_hub_double import HubDouble

pytestmark = pytest.mark.slow
TOKEN = "hf_onedownload0123456789abcdefgh"
MODEL, DATASET = "tests/tiny-base", "tests/tiny-text"


@dataclass
class Seeded:
    """The Hub double with the model and a dataset of one data file, and their head commits."""

    hub: HubDouble
    model_sha: str
    data_sha: str

    def gang(self, doc: dict[str, Any], workdir: Path, env: dict[str, str], nproc: int = 2) -> Gang:
        """2 pods x `nproc` ranks online against the double, each pod with its own HF_HOME."""
        manifest = workdir / "job.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        online = {
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_ENDPOINT": self.hub.endpoint,
            "HF_TOKEN": TOKEN,
        }
        return Gang(manifest, workdir, {**env, **online}, 2, nproc, own_hf_home=True)


@pytest.fixture
def seeded(tiny_model_dir: Path, tiny_text_data: Path, tmp_path: Path) -> Iterator[Seeded]:
    data = tmp_path / "dataset"
    (data / "data").mkdir(parents=True)
    (data / "data" / "train.jsonl").write_text(tiny_text_data.read_text())
    with HubDouble(tmp_path / "hub", tokens=[TOKEN]) as hub:
        model_sha = hub.seed(MODEL, tiny_model_dir)
        yield Seeded(hub, model_sha, hub.seed(DATASET, data, repo_type="dataset"))


def _file_gets(requests: list[tuple[str, str, str | None]]) -> Counter[str]:
    """How often each file was downloaded (GET .../resolve/<commit>/<file>), by repo and file."""
    files: Counter[str] = Counter()
    for method, path, _ in requests:
        if method == "GET" and "/resolve/" in path:
            repo, rest = path.split("/resolve/", 1)
            files[f"{repo}:{rest.split('/', 1)[1]}"] += 1
    return files


def _job(causal_manifest: dict[str, Any], revision: str | None) -> dict[str, Any]:
    return deep_update(
        causal_manifest,
        {
            "spec": {
                "model": {"source": f"hf://{MODEL}", "revision": revision},
                "dataset": {"source": f"hf://{DATASET}", "revision": revision},
                "training": {"maxSteps": 4, "checkpointEverySteps": 2},
                "resources": {"nodes": 2, "processesPerNode": 2},
            }
        },
    )


def _run(gang: Gang) -> list[dict[str, Any]]:
    codes = gang.start().wait(timeout=600)
    assert codes == [0, 0], gang.log_text()[-4000:]
    return [gang.result(i) for i in range(gang.nodes)]


def test_a_shared_cache_downloads_each_file_once_over_pods_and_attempts(
    seeded: Seeded, causal_manifest: dict[str, Any], base_env: dict[str, str], tmp_path: Path
) -> None:
    hub, model_sha, data_sha = seeded.hub, seeded.model_sha, seeded.data_sha
    cache = tmp_path / "checkpoints" / Path(pod.SOURCE_CACHE_DIR).name
    env = {**base_env, pod.HF_HUB_CACHE_ENV: str(cache)}
    gang = seeded.gang(_job(causal_manifest, "main"), tmp_path, env)

    first = _run(gang)
    after_first = len(hub.requests)
    # main moves on between the attempts: the second still loads the commit the first did.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "NOTES.md").write_text("a later commit\n")
    assert hub.seed(MODEL, moved) != model_sha
    second = _run(gang)
    requests = list(hub.requests)

    for result in (first[0], second[0]):
        assert (result["status"], result["steps"]) == ("Succeeded", 4)
        assert (result["modelRevision"], result["datasetRevision"]) == (model_sha, data_sha)
    # The fetch is a phase of its own in the time-to-first-step breakdown.
    stamps = first[0]["phases"]
    assert stamps["rendezvous"] <= stamps["downloaded"] <= stamps["data_loaded"], stamps
    assert second[0]["resumedFromStep"] == 4
    gets = _file_gets(requests)
    assert f"/{MODEL}:model.safetensors" in gets and f"/datasets/{DATASET}:data/train.jsonl" in gets
    assert set(gets.values()) == {1}, gets
    # The second attempt asked the Hub nothing: the commits and the files were on the volume.
    assert requests[after_first:] == [], requests[after_first:]
    log = gang.log_text()
    _assert_prefetched(log)
    assert TOKEN not in log
    assert all(TOKEN not in str(p) for p in cache.rglob("*"))


def test_without_a_shared_cache_rank_0_downloads_each_file_once_and_sends_it(
    seeded: Seeded, causal_manifest: dict[str, Any], base_env: dict[str, str], tmp_path: Path
) -> None:
    gang = seeded.gang(_job(causal_manifest, None), tmp_path, base_env)
    results = _run(gang)
    requests = list(seeded.hub.requests)
    model_sha, data_sha = seeded.model_sha, seeded.data_sha

    assert (results[0]["modelRevision"], results[0]["datasetRevision"]) == (model_sha, data_sha)
    gets = _file_gets(requests)
    assert f"/{MODEL}:config.json" in gets, gets
    # Two pods, each its own cache: every file once, from rank 0 (not once per pod, nor per rank).
    assert set(gets.values()) == {1}, gets
    # Only rank 0 resolved the revisions and listed the model's files: one lookup of each repo
    # and one file listing of the model at its commit.
    repos = {f"/api/models/{MODEL}", f"/api/datasets/{DATASET}"}
    lookups = Counter(p for m, p, _ in requests if m == "GET" and p in repos)
    assert lookups == dict.fromkeys(repos, 1), json.dumps(requests)
    # The second pod's cache holds the same bytes, received from rank 0, and marked whole.
    log = gang.log_text()
    _assert_prefetched(log)
    assert "received" in log and "of sources from rank 0" in log, log[-4000:]
    for repo, sha, kind in ((MODEL, model_sha, "models"), (DATASET, data_sha, "datasets")):
        folder = Path("hub", f"{kind}--{repo.replace('/', '--')}", "snapshots", sha)
        copies = [_files(gang.results[i].parent / "hf" / folder) for i in range(gang.nodes)]
        assert copies[0] and copies[0] == copies[1], (repo, sorted(copies[0]), sorted(copies[1]))


def test_under_fsdp_the_other_pods_get_the_model_without_its_weights(
    seeded: Seeded, causal_manifest: dict[str, Any], base_env: dict[str, str], tmp_path: Path
) -> None:
    """Only rank 0 reads the base's weights under fsdp (the other ranks build the model empty
    and get their shards from it), so the copy to the other pod leaves them out: it gets the
    config and tokenizer, and the whole dataset."""
    doc = deep_update(
        _job(causal_manifest, None),
        {"spec": {"training": {"strategy": "fsdp"}, "resources": {"processesPerNode": 1}}},
    )
    gang = seeded.gang(doc, tmp_path, base_env, nproc=1)
    results = _run(gang)
    assert results[0]["status"] == "Succeeded", results[0]
    assert set(_file_gets(list(seeded.hub.requests)).values()) == {1}
    model = Path("hub", f"models--{MODEL.replace('/', '--')}", "snapshots", seeded.model_sha)
    rank_0, other = (_files(gang.results[i].parent / "hf" / model) for i in range(2))
    assert "model.safetensors" in rank_0 and "config.json" in other, sorted(other)
    assert other == {name: data for name, data in rank_0.items() if name != "model.safetensors"}
    data = Path("hub", f"datasets--{DATASET.replace('/', '--')}", "snapshots", seeded.data_sha)
    assert _files(gang.results[1].parent / "hf" / data) == _files(
        gang.results[0].parent / "hf" / data
    )
    marks = sorted(
        p.name
        for p in (gang.results[1].parent / "hf" / "hub" / ".finetune-fetched").glob("*.complete")
    )
    assert marks == [
        f"datasets--{DATASET.replace('/', '--')}--{seeded.data_sha}.complete",
        f"models--{MODEL.replace('/', '--')}--{seeded.model_sha}.no-weights.complete",
    ]
    log = gang.log_text()
    assert "the base is built empty here" in log, log[-4000:]
    sent = re.search(r"sent ([\d.]+) MiB of sources", log)
    weights = len(rank_0["model.safetensors"]) / (1 << 20)
    assert sent and float(sent[1]) < weights, (sent, weights)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under a snapshot folder (through the cache's links), by its relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_prefetched(log: str) -> None:
    """The files came down while rank 0's pod imported the trainer (finetune_trainer.prefetch),
    which resolved the revisions too: rank 0 found both done."""
    lines = log.splitlines()
    fetched = [line for line in lines if "finetune_trainer.fetch: fetched " in line]
    assert fetched and all("[prefetch]" in line for line in fetched), fetched
    assert any("[rank 0]" in line and "commits resolved before" in line for line in lines), log


def test_sources_larger_than_the_cache_fail_every_rank_at_once_before_any_download(
    seeded: Seeded, causal_manifest: dict[str, Any], base_env: dict[str, str], tmp_path: Path
) -> None:
    """Each pod's /tmp holds template.cacheSize: the tiny model alone is larger than 64Ki, so
    the kubelet would evict a pod that fetched it. Every rank fails as the field, at once."""
    doc = deep_update(_job(causal_manifest, None), {"spec": {"template": {"cacheSize": "64Ki"}}})
    gang = seeded.gang(doc, tmp_path, base_env)
    codes = gang.start().wait(timeout=300)
    assert codes == [ExitCode.INVALID_SPEC] * 2, gang.log_text()[-4000:]
    for node in range(gang.nodes):
        result = gang.result(node)
        assert result["status"] == "Failed" and result["reason"] == "InvalidSpec", result
    message = gang.result(0)["message"]
    assert message.startswith(f"spec.template.cacheSize: no space left for the model {MODEL} ")
    assert "(template.cacheSize is 64Ki)" in message, message
    assert not _file_gets(list(seeded.hub.requests)), "nothing was downloaded"
