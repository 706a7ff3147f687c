"""Checkpoints on a Hub branch: a two-pod gang with no shared volume, real processes, the real
huggingface_hub client and the Hub-API test double.

The reference gang trains uninterrupted and mirrors every checkpoint. A second gang is killed
(SIGKILL, both pods) after the branch holds a checkpoint; a third gang on "new pods", with an
empty checkpoint folder, resumes from the branch and must end exactly where the reference did.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import Gang, deep_update

from finetune_api.pod import CHECKPOINT_HUB_BRANCH_ENV
from finetune_hub_double import HubDouble
from finetune_trainer import checkpoint
from finetune_trainer.checkpoint_mirror import MIRROR_FOLDER, RUN_FILE

pytestmark = pytest.mark.slow
TOKEN = "hf_mirrorgang_token_0123456789abcdef"
BRANCH = "finetune-checkpoints"
STEPS, EVERY = 60, 10
# LoRA dropout draws random numbers every step, so an exact resume needs the RNG state back too.
TRAINING = {"maxSteps": STEPS, "checkpointEverySteps": EVERY}


@dataclass
class Reference:
    hub: HubDouble
    manifest: dict[str, Any]
    result: dict[str, Any]
    params: str
    logs: str
    checkpoints: Path


def branch_commits(hub: HubDouble, repo: str, branch: str = BRANCH) -> list[dict[str, Any]]:
    """The commits of `branch`, newest first, read from the double's store."""
    record = hub.store.get("model", repo)
    commits, cid = [], record["refs"].get(branch)
    while cid:
        commits.append(record["commits"][cid])
        cid = commits[-1]["parent"]
    return commits


def mirrored_step(hub: HubDouble, repo: str) -> int | None:
    """The step of the checkpoint the branch holds, None while it holds none."""
    if not hub.store.exists("model", repo):
        return None
    commits = branch_commits(hub, repo)
    state = commits[0]["files"].get(f"{MIRROR_FOLDER}/trainer_state.json") if commits else None
    if state is None:
        return None
    return int(json.loads(hub.store.blob_path(state["sha256"]).read_text())["step"])


def start(manifest: dict[str, Any], workdir: Path, base_env: dict[str, str]) -> Gang:
    workdir.mkdir(parents=True)
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    env = {**base_env, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, CHECKPOINT_HUB_BRANCH_ENV: BRANCH}
    return Gang(path, workdir, env, nodes=2).start()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubDouble]:
    with HubDouble(tmp_path_factory.mktemp("hub"), tokens=[TOKEN]) as double:
        yield double


@pytest.fixture(scope="module")
def reference(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Reference:
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "training": TRAINING,
                "peft": {"dropout": 0.1},
                "output": {"hub": {"repo": "tests/mirror-reference", "endpoint": hub.endpoint}},
            }
        },
    )
    workdir = tmp_path_factory.mktemp("reference") / "pods"
    pods = start(doc, workdir, base_env)
    try:
        assert pods.wait(timeout=600) == [0, 0], pods.log_text()[-4000:]
    finally:
        pods.kill()
    params = (workdir / "params-0.sha256").read_text()
    return Reference(hub, doc, pods.result(0), params, pods.log_text(), workdir / "checkpoints")


def test_every_checkpoint_is_mirrored_to_the_branch_and_main_is_not_touched(
    reference: Reference,
) -> None:
    hub, repo = reference.hub, "tests/mirror-reference"
    result = reference.result
    assert (result["status"], result["reason"]) == ("Succeeded", "PushedToHub"), result
    assert "resumedFromStep" not in result  # a fresh start
    # One commit per checkpoint on the branch, each replacing the folder.
    titles = [c["title"] for c in branch_commits(hub, repo)]
    job = "FineTuneJob tests/tiny"
    expected = [f"finetune-operator: checkpoint at step {s} of {job}" for s in (60, 50, 40, 30, 20)]
    assert titles[:5] == expected
    assert f"finetune-operator: checkpoint at step 10 of {job}" in titles
    assert mirrored_step(hub, repo) == STEPS
    head = branch_commits(hub, repo)[0]["files"]
    prefix = f"{MIRROR_FOLDER}/"
    mirrored = {p[len(prefix) :]: f["sha256"] for p, f in head.items() if p.startswith(prefix)}
    # The branch holds exactly rank 0's last local checkpoint, plus which run it belongs to.
    (root,) = reference.checkpoints.iterdir()
    local = checkpoint.list_complete(root)[-1][1]
    assert mirrored.pop(RUN_FILE)
    assert mirrored == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in local.iterdir()}
    # main holds the pushed adapter and nothing of the mirror; its head is the push's commit.
    main = branch_commits(hub, repo, "main")
    assert main[0]["id"] == result["revision"]
    assert [c["title"] for c in main][1:] == ["initial commit"]
    assert "adapter_config.json" in main[0]["files"]
    assert not any(p.startswith(MIRROR_FOLDER) for p in main[0]["files"])
    assert "mirrored the checkpoint at step 60" in reference.logs
    assert TOKEN not in reference.logs and TOKEN not in json.dumps(result)


def test_a_new_gang_with_an_empty_checkpoint_folder_resumes_from_the_branch(
    reference: Reference, base_env: dict[str, str], tmp_path: Path
) -> None:
    hub, repo = reference.hub, "tests/mirror-resume"
    doc = deep_update(reference.manifest, {"spec": {"output": {"hub": {"repo": repo}}}})
    first = start(doc, tmp_path / "old-pods", base_env)
    try:
        deadline = time.monotonic() + 300
        while mirrored_step(hub, repo) is None:
            assert time.monotonic() < deadline, first.log_text()[-4000:]
            assert not first.finished(), first.log_text()[-4000:]
            time.sleep(0.02)
    finally:
        first.kill()  # SIGKILL of both pods, mid-training: the nodes and their disks are gone
    step = mirrored_step(hub, repo)
    assert step is not None and step < STEPS, (step, first.log_text()[-3000:])
    assert [c["title"] for c in branch_commits(hub, repo, "main")] == ["initial commit"]

    new_pods = tmp_path / "new-pods"
    second = start(doc, new_pods, base_env)
    try:
        assert second.wait(timeout=600) == [0, 0], second.log_text()[-4000:]
    finally:
        second.kill()
    result = second.result(0)
    assert (result["status"], result["reason"]) == ("Succeeded", "PushedToHub"), result
    assert result["steps"] == STEPS
    assert result["resumedFromStep"] == step, (result, second.log_text()[-3000:])
    logs = second.log_text()
    assert f"restored the checkpoint at step {step} from" in logs
    assert f"resumed from step {step}" in logs
    # Weights, optimizer, schedule, data position and RNG came back from the Hub: the gang ends
    # bit-identical to the uninterrupted reference, and so evaluates the same.
    assert (new_pods / "params-0.sha256").read_text() == reference.params
    after = result["evaluation"]["perplexity"]["after"]
    assert after == pytest.approx(reference.result["evaluation"]["perplexity"]["after"], rel=1e-6)
    assert mirrored_step(hub, repo) == STEPS
    assert TOKEN not in first.log_text() + logs and TOKEN not in json.dumps(result)
