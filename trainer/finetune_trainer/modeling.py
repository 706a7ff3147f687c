"""The base model, its tokenizer, the PEFT wrapping and the precision."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune_api.v1alpha1 import CAUSAL_LM, FineTuneJobSpec, ModelSpec, PeftSpec, Task

MixedPrecision = Literal["no", "bf16", "fp16"]


def source_location(source: str) -> str:
    """hf://org/name -> 'org/name'; file:///models/x -> '/models/x'."""
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    if source.startswith("file://"):
        return source.removeprefix("file://")
    raise ValueError(f"unsupported source {source!r}")


def _revision(spec: ModelSpec) -> str | None:
    return spec.revision if spec.source.startswith("hf://") else None


def mixed_precision(precision: str, cuda: bool | None = None) -> MixedPrecision:
    """`auto` is bf16 only where the hardware computes it natively: CPU bf16 autocast is slower."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return "no" if precision == "fp32" else precision  # type: ignore[return-value]


def lora_config(peft: PeftSpec, task: Task) -> LoraConfig:
    """The LoRA settings of a spec. Empty targetModules means every linear layer but the head,
    which is peft's "all-linear"; a classification head is trained in full (modules_to_save)."""
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=list(peft.target_modules) or "all-linear",
        task_type=TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS,
    )


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        source_location(spec.source), revision=_revision(spec)
    )
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _base_model(
    spec: FineTuneJobSpec, label_names: list[str] | None, **kwargs: object
) -> PreTrainedModel:
    location = source_location(spec.model.source)
    revision = _revision(spec.model)
    if spec.model.task == CAUSAL_LM:
        return AutoModelForCausalLM.from_pretrained(location, revision=revision, **kwargs)
    names = label_names or [str(i) for i in range(spec.model.num_labels or 2)]
    return AutoModelForSequenceClassification.from_pretrained(
        location,
        revision=revision,
        num_labels=spec.model.num_labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        **kwargs,
    )


def load_model(
    spec: FineTuneJobSpec,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None,
    device: torch.device,
) -> PreTrainedModel:
    """The base model for the task, wrapped for PEFT unless the method is `none`.

    `device` is where this rank computes; qlora quantizes the base as it loads, straight onto it.
    """
    kwargs: dict[str, object] = {"dtype": torch.float32}
    if spec.peft.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    model = _base_model(spec, label_names, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.peft.method == "none":
        return model
    if spec.peft.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Non-reentrant checkpointing: the reentrant kind breaks DDP's gradient hooks on the
        # frozen 4-bit base (TRL passes the same for multi-GPU QLoRA).
        model = prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return get_peft_model(model, lora_config(spec.peft, spec.model.task))


def _merged_at_full_precision(model: torch.nn.Module, spec: FineTuneJobSpec) -> PreTrainedModel:
    """A QLoRA adapter merged into the base as the checkpoint stores it (e.g. bf16), on CPU.

    Merging into the 4-bit base would quantize the sum again and ship the quantization error
    with it; this is the QLoRA recipe (and TRL's merge script) instead: reload, then merge.
    """
    from peft import PeftModel

    config = model.config  # type: ignore[union-attr]
    labels = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else None
    base = _base_model(spec, labels, dtype="auto")
    if base.config.pad_token_id is None:
        base.config.pad_token_id = config.pad_token_id
    with tempfile.TemporaryDirectory() as adapter:
        model.save_pretrained(adapter, save_embedding_layers=False)  # type: ignore[operator]
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def artifact_kind(spec: FineTuneJobSpec) -> Literal["adapter", "merged", "full"]:
    if spec.peft.method == "none":
        return "full"
    hub = spec.output.hub
    return "merged" if hub is not None and hub.merge else "adapter"


def save_artifact(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: FineTuneJobSpec,
    out: Path,
) -> Literal["adapter", "merged", "full"]:
    """Save what gets pushed: the adapter, the merged model, or the fully tuned model."""
    kind = artifact_kind(spec)
    if kind == "merged" and spec.peft.method == "qlora":
        model = _merged_at_full_precision(model, spec)
    elif kind == "merged":
        # Merging rewrites the base weights in place; this is the last use of the model.
        model = model.merge_and_unload()  # type: ignore[operator]
    if kind == "adapter":
        # We never resize the embeddings. peft's "auto" would re-read the base config from the
        # Hub to find out, at main rather than the pinned revision.
        model.save_pretrained(out, save_embedding_layers=False)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return kind
