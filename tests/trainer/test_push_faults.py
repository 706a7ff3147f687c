"""Pushes that fail, and sources that are not there: real `finetune train` processes against the
Hub double, whose test faults (finetune_hub_double.faults) fail the next N requests of a kind.

A push is never paid for twice: transient failures are retried in the process, refusals end the
job at once with a permanent exit code, and an attempt after a failed push pushes the artifact
that the failed one kept in the checkpoint folder, without training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import Gang, deep_update

from finetune_api.pod import PERMANENT_EXIT_CODES, ExitCode
from finetune_hub_double import HubDouble
from finetune_hub_double.store import HubError

pytestmark = pytest.mark.slow
TOKEN = "hf_pushfaulttoken0123456789abcdef"
ONLINE = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_TOKEN": TOKEN}
# Training logs `step=i/n ...` after every step at this size (loop.py: every total/50 steps).
STEP_LINE = "step="


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDouble]:
    with HubDouble(tmp_path / "hub", tokens=[TOKEN], faults=True) as double:
        yield double


def _job(manifest: dict[str, Any], hub: HubDouble, repo: str, nodes: int = 1) -> dict[str, Any]:
    return deep_update(
        manifest,
        {
            "spec": {
                "output": {"hub": {"repo": repo, "endpoint": hub.endpoint}},
                "training": {"maxSteps": 6, "checkpointEverySteps": 3},
                "resources": {"nodes": nodes},
            }
        },
    )


def _commits(hub: HubDouble, repo: str) -> int:
    """How many pushes (the trainer's commits) `repo` has on main; 0 when it does not exist."""
    try:
        repo_doc = hub.store.get("model", repo)
    except HubError:
        return 0
    count, commit_id = 0, repo_doc["refs"].get("main")
    while commit_id:
        commit = repo_doc["commits"][commit_id]
        count += commit["title"].startswith("finetune-operator:")  # not the repo's first commit
        commit_id = commit["parent"]
    return count


def _assert_no_token(pods: Gang) -> None:
    text = pods.log_text() + "".join(p.read_text() for p in pods.results if p.exists())
    assert TOKEN not in text


# These two faults also run in `make test`, through the operator: the kind fault suite's
# ft-push503 and ft-push403 (tests/kind/test_faults.py).
@pytest.mark.extended
def test_503s_are_retried_in_the_process(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
) -> None:
    assert hub.faults is not None
    hub.faults.add("commit", 503, 3)
    pods = gang(write_manifest(_job(causal_manifest, hub, "tests/flaky")), nodes=1, env=ONLINE)
    assert pods.start().wait() == [ExitCode.OK], pods.log_text()[-4000:]
    result = pods.result(0)
    assert (result["status"], result["reason"]) == ("Succeeded", "PushedToHub")
    assert hub.faults.state()["fired"] == {"commit": 3}  # each one retried, in this one attempt
    assert _commits(hub, "tests/flaky") == 1
    assert result["steps"] == 6 and "resumedFromStep" not in result  # trained once, from 0
    assert pods.log_text().count("retrying in") == 3
    _assert_no_token(pods)


@pytest.mark.extended
def test_403_ends_the_job_at_once(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
) -> None:
    assert hub.faults is not None
    hub.faults.add("commit", 403, 10)
    pods = gang(write_manifest(_job(causal_manifest, hub, "tests/forbidden")), nodes=1, env=ONLINE)
    codes = pods.start().wait()
    assert codes[0] in PERMANENT_EXIT_CODES, pods.log_text()[-4000:]
    result = pods.result(0)
    assert (result["status"], result["reason"]) == ("Failed", "PushFailed")
    assert result["retryable"] is False and "403" in result["message"]
    assert hub.faults.state()["fired"] == {"commit": 1}  # not retried
    assert _commits(hub, "tests/forbidden") == 0
    _assert_no_token(pods)


def test_a_rerun_after_a_failed_push_pushes_without_training(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
) -> None:
    """The gang is killed while its push waits out a Hub outage; the next attempt, a fresh gang
    on the same checkpoint folder, finds the kept artifact and only pushes it."""
    assert hub.faults is not None
    hub.faults.add("commit", 503, 1000)
    manifest = write_manifest(_job(causal_manifest, hub, "tests/rerun", nodes=2))
    pods = gang(manifest, nodes=2, env=ONLINE).start()
    deadline = time.monotonic() + 600
    while hub.faults.state()["fired"].get("commit", 0) < 2:  # failed, and retried: it backs off
        assert time.monotonic() < deadline and not pods.finished(), pods.log_text()[-4000:]
        time.sleep(0.5)
    pods.kill()
    first_log = pods.log_text()
    assert "kept the final adapter" in first_log and first_log.count(STEP_LINE) > 0
    hub.faults.clear()

    for log in pods.logs:  # the second attempt's logs alone
        log.unlink()
    assert pods.start().wait() == [ExitCode.OK, ExitCode.OK], pods.log_text()[-4000:]
    result = pods.result(0)
    assert (result["status"], result["reason"]) == ("Succeeded", "PushedToHub")
    assert _commits(hub, "tests/rerun") == 1
    # The evaluation and steps of the attempt that trained; nothing trained in this one.
    assert result["steps"] == 6 and result["resumedFromStep"] == 6
    assert "tokensPerSecond" not in result
    assert set(result["evaluation"]["perplexity"]) == {"before", "after"}
    log = pods.log_text()
    assert "pushing it without training" in log
    assert "before training" not in log and "after training" not in log  # no evaluation
    assert log.count(STEP_LINE) == 0, log[-4000:]
    card = hub.store.resolve(hub.store.get("model", "tests/rerun"), "main")["files"]
    assert "README.md" in card and "adapter_config.json" in card
    _assert_no_token(pods)


def test_missing_sources_end_at_once_naming_the_endpoint(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
) -> None:
    cases = [
        ("model", "hf://tests/no-such-model", "ModelNotFound"),
        ("dataset", "hf://tests/no-such-data", "DatasetNotFound"),
        ("model", "file:///nonexistent/model", "ModelNotFound"),
    ]
    for i, (section, source, reason) in enumerate(cases):
        change = {"spec": {section: {"source": source}}}
        doc = deep_update(_job(causal_manifest, hub, "tests/never"), change)
        pods = gang(write_manifest(doc, f"missing-{i}.yaml"), nodes=1, env=ONLINE)
        codes = pods.start().wait()
        assert codes[0] in PERMANENT_EXIT_CODES, pods.log_text()[-4000:]
        result = pods.result(0)
        assert (result["status"], result["reason"]) == ("Failed", reason), json.dumps(result)
        assert source.split("://")[1] in result["message"]
        if source.startswith("hf://"):
            assert hub.endpoint in result["message"] and "huggingface.co" not in result["message"]
            # The prefetch met it first, said so, and left the report to rank 0.
            assert "[prefetch] WARNING" in pods.log_text() and "left to rank 0" in pods.log_text()
        _assert_no_token(pods)
        for log in pods.logs:
            log.unlink()
