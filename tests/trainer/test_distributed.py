"""Two pods, each a real `finetune train` process with the env the operator gives it."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import Gang, deep_update

from finetune_api.pod import ExitCode
from finetune_trainer import checkpoint
from finetune_trainer.store import formed

pytestmark = pytest.mark.slow
# LoRA dropout draws random numbers every step, so an exact resume needs the RNG state back too.
DROPOUT = {"peft": {"dropout": 0.1}}
STEP_SERIES = re.compile(r'^finetune_train_step\{[^}]*rank="1"[^}]*\} (\S+)$', re.M)


@dataclass
class Run:
    gang: Gang
    codes: list[int]
    steps_seen: list[float]
    workdir: Path


def _scrape_steps(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    match = STEP_SERIES.search(text)
    return float(match.group(1)) if match else None


@pytest.fixture(scope="module")
def two_pods(
    tmp_path_factory: pytest.TempPathFactory,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
) -> Run:
    workdir = tmp_path_factory.mktemp("two-pods")
    doc = deep_update(
        causal_manifest,
        {"spec": {"training": {"maxSteps": 150, "checkpointEverySteps": 50}, **DROPOUT}},
    )
    import yaml

    manifest = workdir / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    gang = Gang(manifest, workdir, base_env, nodes=2).start()
    # Scrape rank 1's exporter while it trains, as Prometheus would.
    steps_seen: list[float] = []
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in gang.procs) and time.monotonic() < deadline:
        value = _scrape_steps(gang.metrics_ports[1])
        if value is not None and (not steps_seen or value != steps_seen[-1]):
            steps_seen.append(value)
        time.sleep(0.05)
    codes = gang.wait(timeout=60)
    return Run(gang, codes, steps_seen, workdir)


def test_both_pods_succeed(two_pods: Run) -> None:
    assert two_pods.codes == [0, 0], two_pods.gang.log_text()[-4000:]


def test_cpu_ranks_run_on_tcmalloc_where_it_is_installed(two_pods: Run) -> None:
    """`finetune train` starts itself again with tcmalloc preloaded for a CPU job where the
    library is installed (the trainer image; hack/ci-deps.sh here); rank 0 says which allocator
    its process has mapped (the rank of the other pod starts the same way)."""
    from finetune_api import load_manifest
    from finetune_trainer.env import allocator_env

    job = load_manifest(two_pods.workdir / "job.yaml")
    installed = bool(allocator_env(job, {}))
    want = "tcmalloc" if installed else "the C library's malloc"
    said = [line for line in two_pods.gang.log_text().splitlines() if "memory from" in line]
    assert len(said) == 1 and said[0].endswith(f"memory from {want}"), said


def test_lora_weights_identical_on_both_ranks(two_pods: Run) -> None:
    hashes = [(two_pods.workdir / f"params-{r}.sha256").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]


def test_result_file_from_rank_0(two_pods: Run) -> None:
    result = two_pods.gang.result(0)
    assert result["status"] == "Succeeded"
    assert result["reason"] == "TrainingCompleted"
    assert result["steps"] == 150
    assert result["artifact"] == "adapter"
    assert "resumedFromStep" not in result  # the result message leaves out what is unset
    ppl = result["evaluation"]["perplexity"]
    assert ppl["before"] > ppl["after"] > 0, ppl  # the model learnt something
    # The other pod writes only a small status of its own.
    assert two_pods.gang.result(1) == {"rank": 1, "status": "Succeeded"}
    assert (two_pods.workdir / "output" / "adapter_config.json").is_file()


def test_training_loss_went_down(two_pods: Run) -> None:
    losses = [float(m) for m in re.findall(r"step=\d+/\d+ loss=([\d.]+)", two_pods.gang.log_text())]
    assert len(losses) >= 10
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_metrics_endpoint_shows_steps_moving(two_pods: Run) -> None:
    # At least two scrapes during training saw different, increasing step counts.
    moving = [s for s in two_pods.steps_seen if s > 0]
    assert len(moving) >= 2, two_pods.steps_seen
    assert moving == sorted(moving)


# How often the resumed runs save: every 10 steps, or, with steps too many apart to save
# before the kill, every second (checkpointEverySeconds), at steps that no two runs share.
BY_STEPS = {"checkpointEverySteps": 10}
BY_TIME = {"checkpointEverySteps": 100_000, "checkpointEverySeconds": 1}


@pytest.mark.parametrize(
    ("damaged", "saves"),
    [(False, BY_TIME), (True, BY_STEPS)],
    ids=["whole-saved-by-time", "newest-damaged"],
)
def test_resume_after_the_gang_is_killed(
    two_pods: Run,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
    damaged: bool,
    saves: dict[str, int],
) -> None:
    # The two_pods job, checkpointing more often: checkpoints must not change the training.
    # Saved by time, the ranks still agree on each save's step (one would otherwise wait in
    # the save's gathers for the other until the hang timeout).
    doc = deep_update(
        causal_manifest,
        {"spec": {"training": {"maxSteps": 150, **saves}, **DROPOUT}},
    )
    pods = gang(write_manifest(doc)).start()
    deadline = time.monotonic() + 240
    markers: list[Path] = []
    while len(markers) < (2 if damaged else 1):
        assert time.monotonic() < deadline, pods.log_text()[-4000:]
        assert all(p.poll() is None for p in pods.procs), pods.log_text()[-4000:]
        markers = list((tmp_path / "checkpoints").glob("*/checkpoint-*/COMPLETE"))
        time.sleep(0.02)
    # (Saved by time, these checkpoints exist only through checkpointEverySeconds: no step
    # before the last is a multiple of checkpointEverySteps.)
    pods.kill()  # SIGKILL, mid-training: no chance to clean up
    assert not pods.results[0].exists() or "Succeeded" not in pods.results[0].read_text()
    [root] = (tmp_path / "checkpoints").iterdir()
    held = [step for step, _ in checkpoint.list_complete(root)]
    if damaged:  # the newest cut short in the store, under its marker
        weights = checkpoint.list_complete(root)[-1][1] / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    pods.start()
    assert pods.wait(timeout=240) == [0, 0], pods.log_text()[-4000:]
    result = pods.result(0)
    assert result["status"] == "Succeeded"
    assert result["steps"] == 150
    assert result["resumedFromStep"] == held[-2 if damaged else -1], (result, held)
    assert 1 <= result["resumedFromStep"] < 150, (result, pods.log_text()[-3000:])
    assert f"resumed from step {result['resumedFromStep']}" in pods.log_text()
    assert (f"the checkpoint of step {held[-1]} does not load" in pods.log_text()) == damaged
    # Weights, optimizer, schedule, data position and RNG all came back: the interrupted run
    # ends bit-identical to the uninterrupted one.
    resumed = (tmp_path / "params-0.sha256").read_text()
    assert resumed == (two_pods.workdir / "params-0.sha256").read_text(), result


def test_sigterm_checkpoints_the_gang_and_only_that_pod_restarts(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
) -> None:
    """One pod deleted (evicted, preempted) gets SIGTERM: its launcher passes it on, the whole
    gang finishes the step and saves a checkpoint off the periodic schedule. That pod exits 143
    (the Job's podFailurePolicy ignores it, and the Job controller replaces the pod); the other
    pod stays and starts its ranks again, and with the replacement the gang resumes from that
    step, in place: no new attempt."""
    doc = deep_update(
        causal_manifest,
        {"spec": {"training": {"maxSteps": 5000, "checkpointEverySteps": 100000}}},
    )
    pods = gang(write_manifest(doc)).start()
    deadline = time.monotonic() + 180
    while "step=" not in pods.log_text():  # logged every 100 steps
        assert time.monotonic() < deadline, pods.log_text()[-4000:]
        assert all(p.poll() is None for p in pods.procs), pods.log_text()[-4000:]
        time.sleep(0.1)
    # Rank 0 marked its store once the gang formed: a rank rejoining a later gang passes over
    # this store while it is still there (finetune_trainer.store).
    assert formed("127.0.0.1", pods.master_port)
    stopped = pods.procs[1]
    stopped.send_signal(signal.SIGTERM)  # node 1's launcher only, as the kubelet does
    assert stopped.wait(timeout=60) == ExitCode.INTERRUPTED == 143, pods.log_text()[-4000:]
    with pytest.raises(ProcessLookupError):  # no rank outlived its pod
        os.killpg(stopped.pid, 0)
    rejoining = "a peer left the gang; starting this pod's ranks again to rejoin it (1 of"
    while rejoining not in pods.logs[0].read_text():
        assert time.monotonic() < deadline, pods.log_text()[-4000:]
        assert pods.procs[0].poll() is None, pods.log_text()[-4000:]  # node 0 stays
        time.sleep(0.1)

    saved = sorted((tmp_path / "checkpoints").glob("*/checkpoint-*/COMPLETE"))
    assert len(saved) == 1, saved
    step = int(saved[0].parent.name.split("-")[1])
    assert 100 <= step < 5000
    assert pods.result(1) == {
        "rank": 1,
        "status": "Failed",
        "reason": "Interrupted",
        "message": f"stopped by SIGTERM at step {step}; the gang resumes there",
    }
    result = pods.result(0)  # until rank 0's new process writes its own
    assert (result["status"], result["reason"]) == ("Failed", "Interrupted"), result
    assert result["message"].startswith(f"a peer got SIGTERM: the gang stopped at step {step}")

    pods.replace(1)
    deadline = time.monotonic() + 180
    while f"resumed from step {step}" not in pods.log_text():
        assert time.monotonic() < deadline, pods.log_text()[-4000:]
        assert all(p.poll() is None for p in pods.procs), pods.log_text()[-4000:]
        time.sleep(0.1)
    pods.kill()
