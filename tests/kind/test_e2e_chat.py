"""End to end on kind for chat data: examples/chat-cpu.yaml trained by a 2-pod CPU gang on
HumanEval as conversations, judged by what it generates, pushed, and served.

    pytest -m kind tests/kind/test_e2e_chat.py -s     # fixtures: tests/kind/conftest.py

1. the Hub double as in test_e2e.py (setup_hub), then, through `kubectl port-forward`, the
   example's inputs built here by the script the example names (tests/kind/manifests/
   seed_chat.py, finetune_trainer.example_data's code): HumanEval's chats as
   hf://org/humaneval-chat and the random 4-layer Llama with a chat template as hf://org/tiny-chat;
2. examples/chat-cpu.yaml applied as it is (its spec.serve included), only its namespace and Hub
   endpoint pointed at this namespace's double, and watched until it ends;
3. at the end: Succeeded; chrF, exact_match and perplexity before and after in status, chrF up by
   a margin (measured in the README); the pushed revision holds the full model and a card with
   the samples;
4. spec.serve: status.serve ready at the pushed revision, the serving Deployment owned by the job
   and of that revision, and a chat completion sent with huggingface_hub's InferenceClient from
   inside the cluster (a held-out HumanEval prompt) answered by the served repo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_e2e import printer_columns, run_example, upload_to_double, wait_served

# `make test` proves its parts apart: the chat training and `finetune run --serve` in the trainer
# suite, the serving Deployment and its status against the control plane.
pytestmark = [pytest.mark.kind, pytest.mark.extended]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "chat-cpu.yaml"
SEED_CHAT = Path(__file__).resolve().parent / "manifests" / "seed_chat.py"
FTJ_TIMEOUT_S = 1500
JOB_LABEL = "finetune.dev/job-name"
# What training must add to chrF on the held-out problems (measured in the README).
CHRF_MARGIN = 5.0

# Runs in the serving pod (the trainer image has huggingface_hub): one chat completion through
# the serving Service, as a user would send it.
CHAT = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "0"
from huggingface_hub import InferenceClient
from transformers import AutoModelForCausalLM, AutoTokenizer
url, model, conversations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# What the folder the server loaded (the pod's working directory holds it, by repo id) answers
# greedily, as transformers serve does by default. This weak model ends some turns at once; the
# request asks about the first held-out problem it answers with some text.
tokenizer = AutoTokenizer.from_pretrained(model)
lm = AutoModelForCausalLM.from_pretrained(model)
def greedy(messages):
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    new = lm.generate(**ids, max_new_tokens=64, do_sample=False)[0][ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)
task, messages, local = conversations[0][0], conversations[0][1], ""
for task, messages in conversations:
    local = greedy(messages)
    if local.strip():
        break
out = InferenceClient(base_url=url).chat_completion(messages, model=model, max_tokens=64)
print(json.dumps({
    "task": task,
    "text": out.choices[0].message.content,
    "model": out.model,
    "finish": out.choices[0].finish_reason,
    "local": local,
}))
"""


def seed(kube: Any, namespace: str, token: str, work: Path) -> dict[str, Any]:
    """Build the example's model and data with the seed script the example names, upload them to
    the double, and return the held-out conversations."""
    built = subprocess.run(
        [sys.executable, str(SEED_CHAT), str(work)], capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stderr[-3000:]
    data, model = work / "chat-data", work / "chat-model"
    upload_to_double(
        kube,
        namespace,
        token,
        ("org/tiny-chat", "model", model),
        ("org/humaneval-chat", "dataset", data),
    )
    return [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]


def test_chat_example_trains_generates_and_serves(
    kube: Any,
    images: dict[str, str],
    operator_release: dict[str, str],
    test_namespace: str,
    diagnostics: dict[str, str],
    timing: Any,
    tmp_path: Path,
) -> None:
    ns = test_namespace
    diagnostics["namespace"] = ns
    run = run_example(
        kube, ns, images, timing, EXAMPLE, "chat", lambda token: seed(kube, ns, token, tmp_path)
    )
    job, ftj, hub, held_out = run.job, run.ftj, run.hub, run.seeded
    assert job["spec"]["serve"]["engine"] == "transformers", "the example serves on CPU"
    name, repo = job["metadata"]["name"], job["spec"]["output"]["hub"]["repo"]
    status = ftj["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)

    # ---- evaluation by generation, before and after -------------------------------------------
    evaluation = status["evaluation"]
    assert set(evaluation) == {"chrf", "exact_match", "perplexity"}, evaluation
    for metric, score in evaluation.items():
        assert score.get("before") is not None and score.get("after") is not None, (metric, score)
    chrf = evaluation["chrf"]
    assert chrf["after"] >= chrf["before"] + CHRF_MARGIN, evaluation
    assert evaluation["perplexity"]["after"] < evaluation["perplexity"]["before"], evaluation
    timing.record("chat_chrf", f"{chrf['before']:.2f} -> {chrf['after']:.2f}")
    timing.record("chat_exact_match", json.dumps(evaluation["exact_match"]))
    assert printer_columns(kube, ns, name)["EVAL"].startswith("chrf ")

    pods = kube.json("-n", ns, "get", "pods", "-l", f"{JOB_LABEL}={name}")["items"]
    nodes = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in pods}
    assert len(pods) == 2 and len(set(nodes.values())) == 2, nodes

    # ---- the push: the full model and a card with the samples ---------------------------------
    revision = status["result"]["revision"]
    info = hub.fetch(f"{hub.endpoint}/api/models/{repo}/revision/{revision}", auth=True)
    assert info["status"] == 200, info
    files = {s["rfilename"] for s in json.loads(info["body"]).get("siblings", [])}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files, files
    card = hub.fetch(f"{hub.endpoint}/{repo}/resolve/{revision}/README.md", auth=True)
    assert card["body"].count("### Sample") == job["spec"]["evaluation"]["samples"], card

    # ---- served: the pushed revision answers a chat completion --------------------------------
    t_served = time.monotonic()
    served = wait_served(kube, ns, name, revision)
    timing.record("chat_serve_succeeded_to_ready", time.monotonic() - t_served)
    print(f"status.serve: {json.dumps(served)}", flush=True)
    assert served.get("ready") is True and served.get("revision") == revision, served
    assert served.get("engine") == "transformers", served
    deployment = kube.json("-n", ns, "get", "deployment", f"{name}-serve")
    owners = deployment["metadata"].get("ownerReferences") or []
    assert any(o.get("controller") and o.get("uid") == ftj["metadata"]["uid"] for o in owners)
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert annotations.get("finetune.dev/revision") == revision, annotations

    # Each held-out problem as a user asks it: its conversation up to the answer.
    conversations = [
        (row["task_id"], [m for m in row["messages"] if m["role"] != "assistant"])
        for row in held_out
    ]
    with timing.stopwatch("chat_serve_completion"):
        out = kube(
            "-n", ns, "exec", f"deploy/{name}-serve", "-c", "server", "--",
            "python", "-c", CHAT, served["url"], served["model"], json.dumps(conversations),
            timeout=300,
        )  # fmt: skip
    answer = json.loads(out.strip().splitlines()[-1])
    print(f"chat completion for {answer['task']} from {served['url']}: {answer}", flush=True)
    assert str(answer.get("model", "")).startswith(repo), answer
    assert answer.get("finish") in ("stop", "length"), answer
    # The server answers as the pushed revision does: its text is the revision's own greedy
    # answer, and trained on function bodies, it answers some held-out problem with code.
    assert isinstance(answer.get("text"), str) and answer["text"].strip(), answer
    assert answer["text"].strip() == answer["local"].strip(), answer
    timing.record("chat_serve_answer", json.dumps(answer["text"])[:300])
