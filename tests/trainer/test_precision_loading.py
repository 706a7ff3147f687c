"""Loading by precision and gradient checkpointing, in process on the tiny Llama: the base loads
at half the bytes in bf16 while LoRA's weights stay fp32, attention is SDPA, and checkpointed
layers give the gradients the plain ones give."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from trainer_helpers import deep_update

from finetune_api import parse_manifest
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.tasks import TaskData
from finetune_trainer.tasks.causal_lm import CausalLM
from finetune_trainer.testing.gradients import assert_same_gradients, descend
from finetune_trainer.testing.tiny import sentences

CPU = torch.device("cpu")


def _spec(manifest: dict[str, Any], **training: Any) -> FineTuneJobSpec:
    return parse_manifest(deep_update(manifest, {"spec": {"training": training}})).spec


def _data(spec: FineTuneJobSpec) -> TaskData:
    from datasets import Dataset

    rows = Dataset.from_dict({"text": sentences(8, 3)})
    return CausalLM(spec).build_data(rows, rows)


def _model(spec: FineTuneJobSpec) -> Any:
    torch.manual_seed(0)  # LoRA's A matrices are drawn at wrapping time
    return CausalLM(spec).load_model(_data(spec), CPU)


def _batch(spec: FineTuneJobSpec) -> dict[str, torch.Tensor]:
    data = _data(spec)
    return data.collate([data.train[i] for i in range(len(data.train))])


def _frozen_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def test_bf16_loads_the_base_at_half_the_bytes(causal_manifest: dict[str, Any]) -> None:
    fp32 = _model(_spec(causal_manifest, precision="fp32"))
    bf16 = _model(_spec(causal_manifest, precision="bf16"))
    assert {p.dtype for p in bf16.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in fp32.parameters() if not p.requires_grad} == {torch.float32}
    # The trainable LoRA weights stay fp32 in both, so the optimizer updates fp32 weights.
    for model in (fp32, bf16):
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert _frozen_bytes(bf16) * 2 == _frozen_bytes(fp32)
    assert bf16.config._attn_implementation == "sdpa"


def test_a_bf16_base_trains_under_autocast(causal_manifest: dict[str, Any]) -> None:
    spec = _spec(causal_manifest, precision="bf16")
    model, batch = _model(spec), _batch(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate's bf16 does
            loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", ["lora", "none"])
def test_gradient_checkpointing_gives_the_same_gradients(
    causal_manifest: dict[str, Any], method: str
) -> None:
    grads = []
    for checkpointing in (False, True):
        doc = deep_update(causal_manifest, {"spec": {"peft": {"method": method}}})
        spec = _spec(doc, precision="fp32", gradientCheckpointing=checkpointing)
        model, batch = _model(spec), _batch(spec)
        base = model.get_base_model() if method == "lora" else model
        assert base.is_activation_checkpointing is checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    # The layers' gradients reach LoRA through the recomputed layers (not None, not zero).
    assert_same_gradients(plain, checkpointed)
    assert any(float(g.abs().sum()) > 0 for n, g in checkpointed.items() if "layers.0" in n)


def test_a_bf16_classifier_trains_its_head_in_fp32(tmp_path: Any) -> None:
    """peft's autocast_adapter_dtype covers LoRA's weights; the head's trainable copy
    (modules_to_save) is upcast by the trainer too, so no trained weight is bf16."""
    from finetune_api import load_manifest
    from finetune_trainer.data import load_splits
    from finetune_trainer.example_data import example_manifest
    from finetune_trainer.tasks.sequence_classification import SequenceClassification

    path = tmp_path / "job.yaml"
    path.write_text(example_manifest("minilm-sentiment", tmp_path / "data"))
    doc = load_manifest(path).model_dump(mode="json", by_alias=True, exclude_none=True)
    doc = deep_update(doc, {"spec": {"training": {"precision": "bf16"}}})
    doc["spec"]["dataset"]["maxSamples"] = 16
    spec = parse_manifest(doc).spec
    task = SequenceClassification(spec)
    model = task.load_model(task.build_data(*load_splits(spec)), CPU)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trained), sorted(trained)
    assert set(trained.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_a_dora_learns_magnitudes_and_its_adapter_merges_into_the_same_model(
    causal_manifest: dict[str, Any], tmp_path: Any
) -> None:
    """peft.useDora: every adapted layer gets a magnitude vector, which training moves with the
    LoRA matrices; the saved adapter says use_dora, and merged into a fresh base (what the merge
    and the transformers serving engine do) it gives the trained model's logits."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    doc = deep_update(causal_manifest, {"spec": {"peft": {"useDora": True, "dropout": 0.0}}})
    spec = _spec(doc, precision="fp32")
    model, batch = _model(spec), _batch(spec)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    assert magnitudes and all(
        p.requires_grad for n, p in model.named_parameters() if n in magnitudes
    )
    losses = descend(lambda: model(**batch).loss, model, steps=15, lr=1e-2)
    assert losses[-1] < losses[0], losses
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], before) for n, before in magnitudes.items())

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    base = AutoModelForCausalLM.from_pretrained(spec.model.source.removeprefix("file://"))
    merged = PeftModel.from_pretrained(base, tmp_path).merge_and_unload()
    model.eval()
    with torch.no_grad():
        want, got = model(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
