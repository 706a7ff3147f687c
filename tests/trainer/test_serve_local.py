"""Serving a tuned model for real: `finetune run --serve` (local mode) trains, pushes, and answers
a chat completion from the merged LoRA adapter, and `finetune serve-prepare` (the serving pod's
init container) takes exactly the pushed revision from a Hub (the Hub-API test double)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_trainer.serving import ADAPTER_CONFIG, PLAIN_CHAT_TEMPLATE

CLI = (sys.executable, "-m", "finetune_cli")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A LoRA adapter on the tiny Llama, with non-zero weights (B is zero at init, which would
    make the merge a no-op), saved as the trainer saves one: adapter plus tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_merge_changes_the_model_as_the_adapter_does(
    adapter_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The merged folder computes what base + adapter computes (and not what the base does)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_trainer.serving import prepare

    out = prepare(adapter_dir, tmp_path / "merged", base=f"file://{tiny_model_dir}")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(adapter_dir))(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-3)


PUSH_TWICE = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("tests/tiny-lora", private=True)
first = api.upload_folder(repo_id="tests/tiny-lora", folder_path=sys.argv[1]).oid
api.upload_file(repo_id="tests/tiny-lora", path_in_repo="NOTE.md", path_or_fileobj=b"second")
print(first)
"""


def test_serve_prepare_takes_exactly_the_pushed_revision(
    adapter_dir: Path, tiny_model_dir: Path, base_env: dict[str, str], tmp_path: Path
) -> None:
    """Two pushes to the repo: the init container's command for the first one serves the first
    one's weights, not main's."""
    from finetune_hub_double import HubDouble

    token = "hf_servetest0123456789"
    with HubDouble(tmp_path / "hub", tokens=[token]) as hub:
        env = {**base_env, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": token}
        # huggingface_hub reads the offline switch at import: push from a fresh interpreter.
        push = [sys.executable, "-c", PUSH_TWICE, str(adapter_dir)]
        pushed = subprocess.run(push, env=env, capture_output=True, text=True, check=True)
        first = pushed.stdout.split()[-1]
        out = tmp_path / "model" / "tests" / "tiny-lora"
        prepare = ["serve-prepare", "--repo", "tests/tiny-lora", "--revision", first]
        done = subprocess.run(
            [*CLI, *prepare, "--out", str(out), "--no-merge"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert token not in done.stdout + done.stderr
    assert (out / ADAPTER_CONFIG).is_file()  # kept as an adapter for vLLM / TGI
    assert not (out / "NOTE.md").exists()  # the second push is not in the first revision
    pushed = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() == pushed


def test_the_operators_smoke_request_passes_against_the_real_server(
    adapter_dir: Path, tiny_model_dir: Path, base_env: dict[str, str], tmp_path: Path
) -> None:
    """The operator's smoke request (finetune_operator.smoke) as `transformers serve` answers
    it: passes for the served model name, fails for another (the server is pinned to one)."""
    import asyncio
    import time
    import urllib.request

    from finetune_operator.smoke import chat_smoke
    from finetune_trainer.serving import model_dir, prepare, transformers_serve_command
    from finetune_trainer.testing.gang import free_ports

    root = tmp_path / "root"
    prepare(adapter_dir, model_dir(root, "tests/tiny-lora"), base=f"file://{tiny_model_dir}")
    (port,) = free_ports(1)  # the server binds it only once it has imported transformers
    command = transformers_serve_command("tests/tiny-lora", "127.0.0.1", port)
    server = subprocess.Popen(command, cwd=root, env=base_env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "transformers serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "transformers serve never became healthy"
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}/v1"
        good = asyncio.run(chat_smoke(base, "tests/tiny-lora", timeout=60))
        wrong = asyncio.run(chat_smoke(base, "org/other", timeout=60))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert good.ok, good.message
    assert not wrong.ok and "HTTP 400" in wrong.message


@pytest.mark.slow
def test_finetune_run_serve_trains_pushes_then_serves_the_result(
    causal_manifest: dict[str, Any], base_env: dict[str, str], tmp_path: Path
) -> None:
    """Local mode end to end: `finetune run --serve` trains the 2-node gang, pushes to a Hub
    (the double), then serves the local result and answers one chat message."""
    from finetune_hub_double import HubDouble

    token = "hf_runserve0123456789"
    with HubDouble(tmp_path / "hub", tokens=[token]) as hub:
        doc = json.loads(json.dumps(causal_manifest))
        doc["spec"]["training"]["maxSteps"] = 4
        doc["spec"]["output"] = {"hub": {"repo": "tests/run-serve", "endpoint": hub.endpoint}}
        doc["spec"]["serve"] = {"engine": "transformers"}
        manifest = tmp_path / "job.yaml"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        env = {**base_env, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_TOKEN": token}
        run = ["run", str(manifest), "--workdir", str(tmp_path / "work")]
        done = subprocess.run(
            [*CLI, *run, "--serve", "--request", "red green blue"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    # The request a user can paste names the served model by the output repo id.
    assert "curl -s http://127.0.0.1:" in out and "/v1/chat/completions" in out
    assert '"model": "tests/run-serve"' in out
    assert 'InferenceClient(base_url="http://127.0.0.1:' in out
    # Then the answer to --request: text that came back from the server (its log is on stderr).
    answer = out.rstrip("\n").split("EOF\n")[-1]
    assert answer.strip() and "HTTP/1.1" not in answer, out
    # What was served is the merge, not the adapter: one plain model with the tokenizer's own
    # chat template (the test tokenizer has one; PLAIN_CHAT_TEMPLATE is for those without).
    served = tmp_path / "work" / "serve" / "tests" / "run-serve"
    assert (served / "model.safetensors").is_file()
    assert not (served / ADAPTER_CONFIG).exists()
    config = json.loads((served / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (served / "chat_template.jinja").read_text()
    assert "message['role']" in template and template != PLAIN_CHAT_TEMPLATE
