"""Push to a Hub: the local Hub-API test double, the real huggingface_hub client, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import Gang, deep_update

from finetune_api.result import TrainerResult
from finetune_hub_double import HubDouble

pytestmark = pytest.mark.slow
TOKEN = "hf_pushtesttoken0123456789abcdef"

READ_BACK = """
import json, sys, torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, repo, revision, local = sys.argv[1:]
ids = torch.arange(3, 19).reshape(2, 8)
def logits(source, **kw):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, source, **kw).eval()(input_ids=ids).logits
card = open(hf_hub_download(repo, "README.md", revision=revision)).read()
diff = (logits(repo, revision=revision) - logits(local)).abs().max().item()
print(json.dumps({"diff": diff, "card": card}))
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubDouble]:
    with HubDouble(tmp_path / "hub", tokens=[TOKEN]) as double:
        yield double


def _repo_exists(endpoint: str, repo: str) -> bool:
    request = urllib.request.Request(
        f"{endpoint}/api/models/{repo}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError as exc:
        assert exc.code in (401, 404)
        return False


def test_push_then_read_back_and_gate_blocks_push(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tiny_model_dir: Path,
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    online = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN}
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "output": {"hub": {"repo": "tests/tiny-lora", "endpoint": hub.endpoint}},
                "resources": {"nodes": 1},
            }
        },
    )
    pods = gang(write_manifest(doc), nodes=1, env=online).start()
    assert pods.wait() == [0], pods.log_text()[-4000:]
    result = pods.result(0)
    assert (result["status"], result["reason"]) == ("Succeeded", "PushedToHub")
    assert result["repo"] == "tests/tiny-lora"
    assert len(result["revision"]) == 40
    assert TOKEN not in pods.log_text() and TOKEN not in json.dumps(result)

    # The pushed adapter, read back through the Hub client, equals the one saved locally.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            READ_BACK,
            str(tiny_model_dir),
            "tests/tiny-lora",
            result["revision"],
            str(tmp_path / "output"),
        ],
        env={**base_env, **online, "HF_ENDPOINT": hub.endpoint},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    assert read["diff"] == 0.0
    assert "model-index" in read["card"]

    # A missed gate (perplexity is a maximum) pushes nothing and exits 4, on every pod. Each
    # pod's result carries the whole verdict, scores included: the Job fails as soon as one pod
    # exits 4, and the operator may read rank 1's pod, and finish the job, before rank 0's has
    # ended (ci on 48335bf: a gated job Failed with no status.evaluation).
    gated = deep_update(
        doc,
        {
            "spec": {
                "output": {"hub": {"repo": "tests/gated-lora"}},
                "evaluation": {"gates": {"perplexity": 1.0}},
            }
        },
    )
    pods = gang(write_manifest(gated, "gated.yaml"), nodes=2, env=online).start()
    assert pods.wait() == [4, 4], pods.log_text()[-4000:]
    result = pods.result(0)
    assert (result["status"], result["reason"]) == ("Failed", "EvaluationGateFailed")
    assert "perplexity" in result["message"]
    other = pods.result(1)
    assert other["rank"] == 1
    assert other["evaluation"]["perplexity"] == result["evaluation"]["perplexity"]
    assert TrainerResult.model_validate(other) == TrainerResult.model_validate(
        {**result, "rank": 1}
    )
    assert "revision" not in result  # the result message leaves out what is unset
    assert not _repo_exists(hub.endpoint, "tests/gated-lora")


def test_hub_sources_honour_revision_and_endpoint(
    hub: HubDouble,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tiny_model_dir: Path,
    tiny_text_data: Path,
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """hf:// model and dataset from the endpoint in the spec, at the pinned model revision."""
    good = hub.seed("tests/tiny-base", tiny_model_dir)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert hub.seed("tests/tiny-base", broken) != good  # main is now unloadable
    data = tmp_path / "dataset"
    (data / "data").mkdir(parents=True)
    (data / "data" / "train.jsonl").write_text(tiny_text_data.read_text())
    hub.seed("tests/tiny-text", data, repo_type="dataset")
    doc = deep_update(
        causal_manifest,
        {
            "spec": {
                "model": {"source": "hf://tests/tiny-base", "revision": good},
                "dataset": {"source": "hf://tests/tiny-text"},
                "training": {"maxSteps": 3},
                "output": {"hub": {"repo": "tests/from-hub", "endpoint": hub.endpoint}},
                "resources": {"nodes": 1},
            }
        },
    )
    pods = gang(
        write_manifest(doc),
        nodes=1,
        env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_TOKEN": TOKEN},
    )
    pods.start()
    assert pods.wait() == [0], pods.log_text()[-4000:]
    assert pods.result(0)["reason"] == "PushedToHub"

    # The adapter names its base at the pinned revision: loading it from the Hub as peft users
    # do gets that base, and main (unloadable now) would fail.
    done = subprocess.run(
        [sys.executable, "-c", LOAD_PUSHED_ADAPTER, "tests/from-hub"],
        env={**base_env, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    config = json.loads(done.stdout.strip().splitlines()[-1])
    assert (config["base_model_name_or_path"], config["revision"]) == ("tests/tiny-base", good)


LOAD_PUSHED_ADAPTER = """
import json, sys
from huggingface_hub import hf_hub_download
from peft import AutoPeftModelForCausalLM
AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps(json.load(open(hf_hub_download(sys.argv[1], "adapter_config.json")))))
"""


PUSH_TOKEN = "hf_pushonly0123456789abcdef0123"
MODEL_TOKEN = "model-read-token-0123456789"
DATASET_TOKEN = "dataset-read-token-0123456789"


def test_read_tokens_read_the_sources_and_the_push_opens_a_pull_request(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    gang: Callable[..., Gang],
    tiny_model_dir: Path,
    tiny_text_data: Path,
    tmp_path: Path,
) -> None:
    """Three tokens, each for its own use, on a Hub where nothing is readable anonymously and
    a read token cannot write; the result is a pull request, read back from the Hub."""
    with HubDouble(
        tmp_path / "guarded-hub",
        tokens={PUSH_TOKEN: "pusher"},
        read_tokens={MODEL_TOKEN: "model-reader", DATASET_TOKEN: "dataset-reader"},
        require_auth_for_read=True,
    ) as hub:
        hub.seed("tests/tiny-base", tiny_model_dir)
        data = tmp_path / "dataset"
        (data / "data").mkdir(parents=True)
        (data / "data" / "train.jsonl").write_text(tiny_text_data.read_text())
        hub.seed("tests/tiny-text", data, repo_type="dataset")
        doc = deep_update(
            causal_manifest,
            {
                "spec": {
                    "model": {
                        "source": "hf://tests/tiny-base",
                        "tokenSecretRef": {"name": "model-read"},
                    },
                    "dataset": {
                        "source": "hf://tests/tiny-text",
                        "tokenSecretRef": {"name": "dataset-read"},
                    },
                    "training": {"maxSteps": 3},
                    "output": {
                        "hub": {
                            "repo": "tests/reviewed",
                            "endpoint": hub.endpoint,
                            "createPr": True,
                        }
                    },
                    "resources": {"nodes": 1},
                }
            },
        )
        env = {
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_TOKEN": PUSH_TOKEN,
            "FINETUNE_MODEL_TOKEN": MODEL_TOKEN,
            "FINETUNE_DATASET_TOKEN": DATASET_TOKEN,
        }
        pods = gang(write_manifest(doc), nodes=1, env=env).start()
        assert pods.wait() == [0], pods.log_text()[-4000:]
        result = pods.result(0)
        requests, endpoint = list(hub.requests), hub.endpoint
        repo = hub.store.get("model", "tests/reviewed")

    assert (result["status"], result["reason"]) == ("Succeeded", "PushedToHub")
    assert result["prRevision"] == "refs/pr/1" and "branch" not in result
    assert result["prUrl"] == f"{endpoint}/tests/reviewed/discussions/1"
    # What landed: a pull request against main holding the commit the result names; main is
    # left as the repo's creation made it.
    pr = repo["prs"]["1"]
    assert (pr["base"], pr["head"]) == ("main", result["revision"])
    pushed = repo["commits"][result["revision"]]["files"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(pushed)
    assert set(repo["commits"][repo["refs"]["main"]]["files"]) == {".gitattributes"}

    # Who read and wrote what: each source with its own read token, the push with the push
    # token, and nothing anonymously.
    def users(fragment: str) -> set[str | None]:
        return {user for _, path, user in requests if fragment in path}

    assert users("/tests/tiny-base") == {"model-reader"}
    assert users("/datasets/tests/tiny-text") == {"dataset-reader"}
    assert users("/tests/reviewed") == {"pusher"}
    logs = pods.log_text() + json.dumps(result)
    for token in (PUSH_TOKEN, MODEL_TOKEN, DATASET_TOKEN):
        assert token not in logs
