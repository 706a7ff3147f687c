"""QLoRA's model path, run for real on the CPU backend that bitsandbytes ships.

A FineTuneJob may ask for qlora only with nvidia.com/gpu accelerators (a CEL rule, and the
trainer's own check before it starts): 4-bit training is for fitting large models into GPU
memory, and on CPU it is only slower. The code above the kernels is the same on both, so these
tests run it here: a real nf4 base from bitsandbytes, peft's k-bit preparation and LoRA on top,
training steps, the saved adapter and the merge. Only the CUDA kernels are left to a GPU
(tests/trainer/gpu_smoke.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import deep_update

from finetune_api import parse_manifest
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import modeling
from finetune_trainer.tasks import TaskData
from finetune_trainer.tasks.causal_lm import CausalLM
from finetune_trainer.testing.gradients import descend
from finetune_trainer.testing.tiny import sentences

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the trainer extra")

CPU = torch.device("cpu")


def _spec(manifest: dict[str, Any], merge: bool) -> FineTuneJobSpec:
    doc = deep_update(
        manifest,
        {
            "spec": {
                "peft": {"method": "qlora"},
                "resources": {
                    "nodes": 1,
                    "accelerator": {"type": "nvidia.com/gpu", "count": 1},
                },
                "output": {
                    "hub": {
                        "repo": "tests/tiny-qlora",
                        "merge": merge,
                        "tokenSecretRef": {"name": "hf-token"},  # huggingface.co needs one
                    }
                },
            }
        },
    )
    return parse_manifest(doc).spec


def _data(spec: FineTuneJobSpec) -> TaskData:
    """The task's data for the spec, on a few rows: the model and the save need its tokenizer."""
    from datasets import Dataset

    rows = Dataset.from_dict({"text": sentences(8, 3)})
    return CausalLM(spec).build_data(rows, rows)


def _trained(spec: FineTuneJobSpec, batch: dict[str, torch.Tensor]) -> tuple[Any, list[float]]:
    model = CausalLM(spec).load_model(_data(spec), CPU)
    return model, descend(lambda: model(**batch).loss, model, steps=20, lr=1e-2)


@pytest.fixture(scope="module")
def batch(causal_manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    tokenizer = modeling.load_tokenizer(_spec(causal_manifest, merge=False).model)
    enc = tokenizer(sentences(8, 3), return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def test_qlora_trains_lora_on_a_frozen_nf4_base(
    causal_manifest: dict[str, Any], batch: dict[str, torch.Tensor]
) -> None:
    spec = _spec(causal_manifest, merge=False)
    model, losses = _trained(spec, batch)

    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 layers x (q, k, v, o, gate, up, down); the LM head stays full precision.
    assert len(linear4) == 14
    assert {m.weight.quant_state.quant_type for m in linear4} == {"nf4"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert losses[-1] < losses[0] - 0.3, losses


def test_qlora_adapter_reloads_onto_the_full_precision_base(
    causal_manifest: dict[str, Any], batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = _spec(causal_manifest, merge=False)
    model, _ = _trained(spec, batch)
    assert CausalLM(spec).save(model, _data(spec), tmp_path) == "adapter"

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == spec.peft.r
    base = AutoModelForCausalLM.from_pretrained(modeling.source_location(spec.model.source))
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    trained = modeling.trainable_state(model)
    # Reloaded adapters are frozen (inference mode), so pick them by name.
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert saved.keys() == trained.keys()
    for name, value in saved.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


def test_qlora_merge_happens_at_full_precision(
    causal_manifest: dict[str, Any], batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = _spec(causal_manifest, merge=True)
    model, _ = _trained(spec, batch)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter, save_embedding_layers=False)
    assert CausalLM(spec).save(model, _data(spec), tmp_path / "merged") == "merged"

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())

    location = modeling.source_location(spec.model.source)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(location), adapter)
    plain = AutoModelForCausalLM.from_pretrained(location)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        got = merged(**inputs).logits
        want = expected(**inputs).logits
        before = plain(**inputs).logits
    # The merge equals base + adapter at full precision, and the adapter changed the model.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - before).abs().max() > 1e-2
