"""Chat data end to end: a 2-rank gang trains on multi-turn conversations through the test
tokenizer's chat template, generates the last assistant turn before and after training, scores
it, pushes, and the model card on the Hub shows the samples; a bad row fails at once, for good.

The toy set is learnable: the user says one of `WORDS`, and the assistant answers "you said"
and that word. The random tiny Llama knows none of it (exact match 0), and after a short full
fine-tune it answers many held-out conversations right (the words recur, the conversations do
not).
"""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import Gang, deep_update

from finetune_api.pod import PERMANENT_EXIT_CODES
from finetune_hub_double import HubDouble
from finetune_trainer.testing.tiny import WORDS

pytestmark = pytest.mark.slow
TOKEN = "hf_chattesttoken0123456789abcdef"
SYSTEM = "repeat after me"


def _answer(word: str) -> str:
    # A constant lead-in, then the user's last word again: greedy decoding of a half-trained model
    # starts the answer instead of ending it at once, and copying the word is within a tiny
    # model's reach in a hundred steps, where looking up PARTNER is not.
    return f"you said {word}"


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    """An optional system prompt, then one to three user/assistant exchanges."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for word in rng.sample(WORDS, rng.randint(1, 3)):
        messages += [
            {"role": "user", "content": word},
            {"role": "assistant", "content": _answer(word)},
        ]
    return messages


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def _chat_job(causal_manifest: dict[str, Any], data_dir: Path, **spec: Any) -> dict[str, Any]:
    rng = random.Random(5)
    train = _write(data_dir / "train.jsonl", [_conversation(rng) for _ in range(400)])
    _write(data_dir / "test.jsonl", [_conversation(rng) for _ in range(24)])
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "dataset": {
                    "source": f"file://{train.parent}",
                    "evalSplit": "test",
                    "evalFraction": None,
                    "messagesField": "messages",
                },
                "peft": {"method": "none"},
                "training": {
                    "maxSteps": 100,
                    "learningRate": 1.0e-2,
                    "batchSizePerDevice": 8,
                    "maxSeqLength": 128,
                    "packing": False,
                    "checkpointEverySteps": 1000,
                },
                "evaluation": {
                    "metrics": ["exact_match", "chrf", "perplexity"],
                    "maxNewTokens": 16,
                    "samples": 2,
                    "maxSamples": None,
                },
            }
        },
    )
    return deep_update(doc, {"spec": spec})


def test_chat_training_moves_generation_scores_and_the_card_shows_samples(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "chat"
    data_dir.mkdir()
    with HubDouble(tmp_path / "hub", tokens=[TOKEN]) as hub:
        doc = _chat_job(
            causal_manifest,
            data_dir,
            output={"hub": {"repo": "tests/chat", "endpoint": hub.endpoint}},
        )
        pods = gang(
            write_manifest(doc), nodes=2, env={"HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN}
        ).start()
        assert pods.wait(timeout=600) == [0, 0], pods.log_text()[-4000:]
        result = pods.result(0)
        assert result["status"] == "Succeeded", result
        scores = result["evaluation"]
        assert set(scores) == {"exact_match", "chrf", "perplexity"}
        # Reported before and after, and moving the right way on a learnable set.
        assert scores["exact_match"]["before"] == 0.0
        assert scores["exact_match"]["after"] >= 0.25, (
            json.dumps(result["samples"]) + pods.log_text()[-3000:]
        )
        assert scores["chrf"]["after"] > scores["chrf"]["before"] + 10, scores
        assert scores["perplexity"]["after"] < scores["perplexity"]["before"]
        # Two samples: the last user word, its partner, and both answers.
        samples = result["samples"]
        assert len(samples) == 2
        for sample in samples:
            assert sample["reference"] == _answer(sample["prompt"])
            assert "before" in sample and "after" in sample
        request = urllib.request.Request(
            f"{hub.endpoint}/tests/chat/resolve/{result['revision']}/README.md",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            card = response.read().decode()
    samples_section = card[card.index("## Samples") : card.index("## Usage")]
    assert samples_section.count("### Sample") == 2
    for sample in samples:
        assert f"After training:\n\n```text\n{sample['after']}\n```" in samples_section
        assert f"Reference:\n\n```text\n{sample['reference']}\n```" in samples_section


def test_a_bad_messages_row_fails_at_once_and_for_good(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "chat"
    data_dir.mkdir()
    doc = _chat_job(causal_manifest, data_dir)
    rows = [json.loads(line)["messages"] for line in (data_dir / "train.jsonl").open()]
    rows[7] = [{"role": "user", "content": "red"}, {"role": "bot", "content": "blue"}]
    _write(data_dir / "train.jsonl", rows)
    pods = gang(write_manifest(doc), nodes=2).start()
    codes = pods.wait(timeout=300)
    assert codes[0] in PERMANENT_EXIT_CODES, pods.log_text()[-4000:]
    result = pods.result(0)
    assert (result["status"], result["reason"]) == ("Failed", "InvalidDataset")
    assert (
        "row 7: message 1 has role 'bot'; roles are system, user, assistant" in (result["message"])
    )
