"""Failure classes on a real two-pod gang: a user error fails at once and for good, a stopped
rank ends the attempt as CollectiveTimeout (retryable) long before torch's own timeout, in
training, in evaluation and while evaluation generates answers."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import Gang, deep_update

from finetune_api.pod import PERMANENT_EXIT_CODES, ExitCode
from finetune_trainer.testing.tiny import WORDS, save_test_text

pytestmark = pytest.mark.slow


def test_missing_text_column_fails_at_once_and_for_good(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
) -> None:
    doc = deep_update(causal_manifest, {"spec": {"dataset": {"textField": "body"}}})
    g = gang(write_manifest(doc)).start()
    codes = g.wait(timeout=180)
    assert codes[0] in PERMANENT_EXIT_CODES, g.log_text()[-4000:]
    result = g.result(0)
    assert result["status"] == "Failed" and result["reason"] == "InvalidDataset"
    message = result["message"]
    assert "spec.dataset.textField" in message and "'body'" in message
    assert "last lines of rank 0's log" in message
    assert not (g.workdir / "checkpoints").exists() or not any(
        (g.workdir / "checkpoints").rglob("*")
    ), "nothing trained, so nothing was checkpointed"


def rank_1_stopped_once(g: Gang, line: str) -> str:
    """Freeze node 1's ranks (SIGSTOP) once rank 0 logged `line`; rank 0 must end the attempt
    as CollectiveTimeout (retryable) under hangTimeoutSeconds=10. Its result's message."""
    deadline = time.monotonic() + 180
    while line not in g.logs[0].read_text(errors="replace"):
        assert not g.finished() and time.monotonic() < deadline, g.log_text()[-4000:]
        time.sleep(0.1)
    os.killpg(g.procs[1].pid, signal.SIGSTOP)
    # The bound: the 10 s floor plus the watchdog's poll, with room for a loaded machine; torch's
    # own collective timeout would take 30 minutes.
    code = g.procs[0].wait(timeout=60)
    assert code == ExitCode.RETRYABLE, g.log_text()[-4000:]
    result = g.result(0)
    assert result["status"] == "Failed" and result["reason"] == "CollectiveTimeout"
    assert "hangTimeoutSeconds=10" in result["message"]
    # When rank 0's gang formed, which dates the pods made after it (restarts.departed_unseen).
    assert result["phases"]["rendezvous"] > result["phases"]["process_started"], result
    return str(result["message"])


# Checkpointing after every step puts the stop in the step after a save, which the watchdog
# once left untimed until the next step completed (that is, forever).
# A save every step is the harder case (a rank may stop in or between saves); without saves is
# the same watchdog on the plain loop.
@pytest.mark.parametrize(
    "every",
    [pytest.param(5000, marks=pytest.mark.extended), 1],
    ids=["no-saves", "a-save-every-step"],
)
def test_a_stopped_rank_ends_the_attempt_as_collective_timeout(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    every: int,
) -> None:
    # The floor at its minimum keeps the test short; tiny steps leave 3 x p99 far below it.
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "training": {"maxSteps": 5000, "checkpointEverySteps": every},
                "runPolicy": {"hangTimeoutSeconds": 10},
            }
        },
    )
    g = gang(write_manifest(doc)).start()
    message = rank_1_stopped_once(g, "step=")  # node 1 freezes mid-training
    assert "after step" in message


def test_a_rank_stopped_during_evaluation_ends_the_attempt_as_collective_timeout(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
) -> None:
    """The evaluation before training gathers after every batch: a rank that stops meanwhile
    (its node frozen) is caught as in a training step, not after torch's 30 minutes."""
    # 4,000 held-out rows one per batch: seconds of evaluation, to stop a rank in.
    data = save_test_text(tmp_path / "text.jsonl", rows=8000)
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "dataset": {"source": f"file://{data}", "evalFraction": 0.5},
                "evaluation": {"maxSamples": 4000},
                "training": {"batchSizePerDevice": 1},
                "runPolicy": {"hangTimeoutSeconds": 10},
            }
        },
    )
    g = gang(write_manifest(doc)).start()
    message = rank_1_stopped_once(g, "evaluating before training")
    assert message.startswith("no evaluation step completed in "), message
    assert "step=" not in g.logs[0].read_text(errors="replace"), "it got past the evaluation"


def test_a_rank_stopped_while_answers_are_generated_ends_the_attempt_as_collective_timeout(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
) -> None:
    """Evaluation by generation runs the ranks in lockstep, each generated token a step of the
    gang: a rank that stops meanwhile is caught as in a training step. Before, the others went
    on with their own prompts and then waited in the final gather, untimed, for torch's 30
    minutes."""
    rows = [{"prompt": w, "response": f"you said {w}"} for w in WORDS * 40]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "dataset": {
                    "source": f"file://{data}",
                    "evalFraction": 0.5,
                    "promptField": "prompt",
                    "responseField": "response",
                },
                # Only a score of generated text: the evaluation begins by generating.
                "evaluation": {"metrics": ["exact_match"], "maxNewTokens": 64, "maxSamples": 400},
                "training": {"batchSizePerDevice": 1, "packing": False},
                "runPolicy": {"hangTimeoutSeconds": 10},
            }
        },
    )
    g = gang(write_manifest(doc)).start()
    message = rank_1_stopped_once(g, "evaluating before training")
    assert message.startswith("no evaluation step completed in "), message
    assert "before training:" not in g.logs[0].read_text(errors="replace"), "it scored the answers"
