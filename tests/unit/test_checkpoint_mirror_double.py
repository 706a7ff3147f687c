"""The checkpoint mirror against the Hub-API test double, with the real huggingface_hub client.

Checkpoints are real ones (`checkpoint.save` of small tensors); the double runs in this process
and the client is pointed at it explicitly. Only `sleep` is replaced, by a recorder, so that the
retries' waits are counted instead of waited.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_api import ManifestError
from finetune_api.pod import CHECKPOINT_HUB_BRANCH_ENV
from finetune_api.v1alpha1 import FineTuneJob
from finetune_hub_double import HubDouble
from finetune_trainer import checkpoint
from finetune_trainer.checkpoint_mirror import MIRROR_FOLDER, CheckpointMirror, MirrorError
from finetune_trainer.hub_retry import Backoff
from finetune_trainer.telemetry import TrainerMetrics
from finetune_trainer.testing.gang import free_ports

TOKEN = "hf_mirrortest_good_0123456789abcdef"
REPO = "org/mirrored"
BRANCH = "finetune-checkpoints"
RUN = "tiny-0123456789ab"
FILES = [
    "COMPLETE",
    "finetune-run.json",
    "optimizer.pt",
    "rng.pt",
    "scheduler.pt",
    "trainable.safetensors",
    "trainer_state.json",
]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDouble]:
    # A low LFS threshold sends the weights and optimizer through LFS uploads, as on the Hub.
    with HubDouble(tmp_path / "hub-root", tokens=[TOKEN], lfs_threshold=1000) as double:
        yield double


@pytest.fixture
def online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub online, without Xet, with this test's token and cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_mirror(
    endpoint: str, run: str = RUN, telemetry: TrainerMetrics | None = None
) -> tuple[CheckpointMirror, Sleeps]:
    sleeps = Sleeps()
    mirror = CheckpointMirror(
        repo=REPO,
        branch=BRANCH,
        endpoint=endpoint,
        private=True,
        run=run,
        job="tests/tiny",
        telemetry=telemetry,
        backoff=Backoff(retries=3, base_seconds=0.5, max_seconds=1.0),
        sleep=sleeps,
    )
    return mirror, sleeps


def save(root: Path, step: int) -> Path:
    torch.manual_seed(step)
    return checkpoint.save(
        root,
        checkpoint.Checkpoint(
            state=checkpoint.TrainerState(
                step=step, epoch=0, batches_in_epoch=step, world_size=2, loss_history=[1.0]
            ),
            trainable={"lora.weight": torch.randn(32, 32)},
            optimizer={"state": {0: {"exp_avg": torch.randn(32, 32)}}, "param_groups": []},
            scheduler={"last_epoch": step},
            rng=[checkpoint.capture_rng(), checkpoint.capture_rng()],
        ),
        keep=2,
    )


def api(endpoint: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=TOKEN)


def stale(telemetry: TrainerMetrics) -> float | None:
    return telemetry.registry.get_sample_value("finetune_checkpoint_mirror_stale", telemetry.labels)


def test_mirror_replaces_the_branch_checkpoint_and_a_new_gang_restores_it(
    hub: HubDouble, online: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    telemetry = TrainerMetrics("tiny", "tests", 0, process_metrics=False)
    mirror, sleeps = make_mirror(hub.endpoint, telemetry=telemetry)
    pods = tmp_path / "old-pods"
    first = save(pods, 10)
    (first / "leftover.bin").write_bytes(b"only in the first")  # must not survive the next one
    assert mirror.upload(first) and mirror.mirrored_step == 10
    second = save(pods, 20)
    assert mirror.upload(second) and mirror.mirrored_step == 20
    assert sleeps == [] and stale(telemetry) == 0

    hub_api = api(hub.endpoint)
    files = hub_api.list_repo_files(REPO, revision=BRANCH)
    assert sorted(files) == [".gitattributes", *(f"{MIRROR_FOLDER}/{f}" for f in FILES)]
    assert hub_api.list_repo_files(REPO) == [".gitattributes"]  # main is untouched
    assert hub_api.repo_info(REPO).private
    titles = [c.title for c in hub_api.list_repo_commits(REPO, revision=BRANCH)]
    assert titles[:2] == [
        "finetune-operator: checkpoint at step 20 of FineTuneJob tests/tiny",
        "finetune-operator: checkpoint at step 10 of FineTuneJob tests/tiny",
    ]  # one commit per checkpoint

    # New pods: an empty checkpoint folder, filled from the branch.
    fresh = tmp_path / "new-pods"
    restorer, _ = make_mirror(hub.endpoint)
    restored = restorer.restore(fresh)
    assert restored is not None and restorer.mirrored_step == 20
    assert [folder for _, folder in checkpoint.list_complete(fresh)] == [restored]
    assert [p.name for p in fresh.iterdir()] == [restored.name]  # no scratch folder left
    got, want = checkpoint.load(restored), checkpoint.load(second)
    assert got.state == want.state
    assert torch.equal(got.trainable["lora.weight"], want.trainable["lora.weight"])
    assert torch.equal(got.optimizer["state"][0]["exp_avg"], want.optimizer["state"][0]["exp_avg"])
    assert got.rng[1]["numpy"][1].tolist() == want.rng[1]["numpy"][1].tolist()
    assert json.loads((restored / "finetune-run.json").read_text())["step"] == 20
    assert TOKEN not in caplog.text


def test_nothing_to_restore_means_a_fresh_start(
    hub: HubDouble, online: None, tmp_path: Path
) -> None:
    mirror, sleeps = make_mirror(hub.endpoint)
    assert mirror.restore(tmp_path / "a") is None  # no repo
    hub_api = api(hub.endpoint)
    hub_api.create_repo(REPO, private=True)
    assert mirror.restore(tmp_path / "b") is None  # no branch
    hub_api.create_branch(REPO, branch=BRANCH)
    assert mirror.restore(tmp_path / "c") is None  # a branch without a checkpoint
    # A checkpoint of another run (the spec changed): not resumed.
    other, _ = make_mirror(hub.endpoint, run="tiny-fedcba987654")
    assert other.upload(save(tmp_path / "other", 30))
    assert mirror.restore(tmp_path / "d") is None
    assert checkpoint.list_complete(tmp_path / "d") == []
    assert sleeps == []


def test_a_failed_upload_is_retried_then_training_goes_on_with_a_stale_mirror(
    hub: HubDouble, online: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = TrainerMetrics("tiny", "tests", 0, process_metrics=False)
    (port,) = free_ports(1)  # nothing listens there: every connection is refused
    down, sleeps = make_mirror(f"http://127.0.0.1:{port}", telemetry=telemetry)
    folder = save(tmp_path / "pods", 10)
    assert down.upload(folder) is False
    assert sleeps == [0.5, 1.0, 1.0]  # Backoff(retries=3): doubling, capped
    assert stale(telemetry) == 1
    assert "checkpoint mirror stale" in caplog.text and "holds no checkpoint" in caplog.text
    # A Hub that cannot be read at start fails the attempt instead of starting afresh.
    with pytest.raises(MirrorError, match="cannot read the mirrored checkpoint"):
        down.restore(tmp_path / "new-pods")
    assert len(sleeps) == 6

    # Once the Hub answers again, the next checkpoint brings the branch up to date.
    up, _ = make_mirror(hub.endpoint, telemetry=telemetry)
    assert up.upload(save(tmp_path / "pods", 20))
    assert stale(telemetry) == 0
    assert TOKEN not in caplog.text


def test_a_refused_token_is_not_retried_and_never_logged(
    hub: HubDouble,
    online: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = "hf_mirrortest_wrong_fedcba9876543210"
    monkeypatch.setenv("HF_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    mirror, sleeps = make_mirror(hub.endpoint)
    assert mirror.upload(save(tmp_path / "pods", 10)) is False
    assert sleeps == []  # 401: waiting would not help
    with pytest.raises(MirrorError) as refused:
        mirror.restore(tmp_path / "new-pods")
    assert "401" in str(refused.value) and sleeps == []
    assert wrong not in caplog.text and wrong not in str(refused.value)


def test_checkpoints_never_go_to_a_public_repo_the_spec_wants_private(
    tmp_path: Path, online: None, caplog: pytest.LogCaptureFixture
) -> None:
    with HubDouble(tmp_path / "hub-root", tokens=[TOKEN], faults=True) as hub:
        hub_api = api(hub.endpoint)
        hub_api.create_repo(REPO, private=False)
        assert hub.faults is not None
        hub.faults.add("settings", 403)  # this token may not change the repo's settings
        mirror, sleeps = make_mirror(hub.endpoint)
        assert mirror.upload(save(tmp_path / "pods", 10)) is False
        assert sleeps == [] and "output.hub.private is true" in caplog.text
        assert BRANCH not in [b.name for b in hub_api.list_repo_refs(REPO).branches]
        # A token that may: the repo is made private, then the checkpoint goes up.
        assert mirror.upload(save(tmp_path / "pods", 20))
        assert hub_api.repo_info(REPO).private is True
        assert "was public; made it private" in caplog.text


def job(hub: dict[str, Any] | None) -> FineTuneJob:
    spec: dict[str, Any] = {
        "model": {"source": "hf://org/model"},
        "dataset": {"source": "hf://org/data"},
    }
    if hub is not None:
        spec["output"] = {"hub": hub}
    meta = {"name": "tiny", "namespace": "ns"}
    return FineTuneJob.model_validate({"metadata": meta, "spec": spec})


def test_from_env() -> None:
    hub = {"repo": "org/out", "endpoint": "http://hub.example:8080/", "private": False}
    assert CheckpointMirror.from_env(job(hub), RUN, env={}) is None
    mirror = CheckpointMirror.from_env(job(hub), RUN, env={CHECKPOINT_HUB_BRANCH_ENV: BRANCH})
    assert mirror is not None
    assert (mirror.repo, mirror.branch) == ("org/out", BRANCH)
    assert mirror.endpoint == "http://hub.example:8080"
    assert (mirror.private, mirror.run, mirror.job) == (False, RUN, "ns/tiny")
    with pytest.raises(ManifestError, match=r"spec\.output\.hub is not"):
        CheckpointMirror.from_env(job(None), RUN, env={CHECKPOINT_HUB_BRANCH_ENV: BRANCH})
    with pytest.raises(ManifestError, match="not a valid branch name"):
        CheckpointMirror.from_env(job(hub), RUN, env={CHECKPOINT_HUB_BRANCH_ENV: "a b"})
