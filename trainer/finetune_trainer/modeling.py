"""What every transformers task shares about its model: the tokenizer, the precision, the PEFT
wrapping (LoRA, QLoRA's 4-bit base, or none) and the saved artifact.

A task module says which auto class and arguments load its base (`BaseLoader`); the rest is here.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import tempfile
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from finetune_api import FieldError, ManifestError
from finetune_api.v1alpha1 import FineTuneJobSpec, ModelSpec, PeftSpec, VaeSpec
from finetune_trainer import fetch
from finetune_trainer.sources import SourceKind, downloading
from finetune_trainer.tasks.base import Artifact

log = logging.getLogger(__name__)

MixedPrecision = Literal["no", "bf16", "fp16"]


def source_location(source: str) -> str:
    """hf://org/name -> 'org/name'; file:///models/x -> '/models/x'."""
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    if source.startswith("file://"):
        return source.removeprefix("file://")
    raise ValueError(f"unsupported source {source!r}")


def pinned_revision(spec: ModelSpec | VaeSpec, kind: SourceKind = "model") -> str | None:
    """The revision the model (or model.vae) loads at: the commit rank 0 resolved (fetch.py), else
    its revision field; None for a file:// one."""
    return fetch.revision_to_load(kind, spec.source, spec.revision)


def cached_only(spec: ModelSpec | VaeSpec, kind: SourceKind = "model") -> bool:
    """Whether the model's (or model.vae's) commit is in the hub cache already (fetch.py): then
    every rank reads it there and asks the Hub nothing."""
    return fetch.pinned(kind, spec.source) is not None


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def mixed_precision(precision: str, bf16_hardware: bool | None = None) -> MixedPrecision:
    """The autocast of a precision. `auto` is bf16 only where the hardware computes it natively
    (`bf16_hardware`: a CUDA device with bf16; CPU bf16 autocast is slower than fp32)."""
    bf16_hardware = _cuda_bf16() if bf16_hardware is None else bf16_hardware
    if precision == "auto":
        return "bf16" if bf16_hardware else "no"
    return "no" if precision == "fp32" else precision  # type: ignore[return-value]


_HALF: dict[MixedPrecision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(precision: str, method: str, bf16_hardware: bool | None = None) -> torch.dtype:
    """The dtype the base weights load in. A frozen base (lora) loads at the compute precision,
    half the memory of fp32; its trainable LoRA weights stay fp32 (peft's
    autocast_adapter_dtype), so the optimizer never updates half-precision weights. Full
    fine-tuning (none) keeps fp32 master weights, which the optimizer updates, and computes under
    autocast; qlora's base is 4-bit, and peft's k-bit preparation upcasts the rest to fp32."""
    if method != "lora":
        return torch.float32
    return _HALF.get(mixed_precision(precision, bf16_hardware), torch.float32)


def gradient_checkpointing(spec: FineTuneJobSpec) -> bool:
    """training.gradientCheckpointing, whose unset default is on for qlora and off otherwise."""
    configured = spec.training.gradient_checkpointing
    return spec.peft.method == "qlora" if configured is None else configured


# What the first optimizer step may take beyond runPolicy.hangTimeoutSeconds when it compiles the
# layers: about 20 s for an 8B Llama on an H200, and over 60 s for the tiny test model's on two
# busy CPU cores (inductor's C++ builds).
FIRST_STEP_COMPILE_S = 600.0


def compiles(spec: FineTuneJobSpec) -> bool:
    """training.compile, whose unset default is on where it was measured to pay: a causal LM's
    LoRA or full fine-tune under DDP on CUDA GPUs (an 8B LoRA step in 0.55 s instead of 0.77 s
    on an H200, docs/benchmarks.md). On CPU the compile costs more than it saves on short jobs;
    a 4-bit base's bitsandbytes kernels are opaque to the compiler; FSDP with compiled layers
    has not run on a GPU here yet."""
    configured = spec.training.compile
    if configured is not None:
        return configured
    return (
        spec.model.task == "causal-lm"
        and spec.resources.accelerator.type == "nvidia.com/gpu"
        and spec.peft.method in ("lora", "none")
        and spec.training.strategy == "ddp"
    )


def compiler_missing() -> str | None:
    """What torch.compile lacks here to build its kernels, or None. Triton's GPU launcher and
    inductor's CPU kernels are built when the first step runs, with a C compiler (Triton looks
    at $CC, clang, gcc) against Python's headers; without them that step fails."""
    compilers = [c for c in (os.environ.get("CC"), "clang", "gcc", "cc") if c]
    if not any(shutil.which(c) for c in compilers):
        return "no C compiler on PATH ($CC, clang, gcc or cc)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no Python headers ({headers})"
    return None


def apply_compile(spec: FineTuneJobSpec, model: torch.nn.Module) -> int:
    """Compile the model's layers where training.compile (or its default) says so, and log what
    was done; the number of layers compiled (0: the model runs eagerly). Asked for on a machine
    that cannot build the kernels is a spec error, said at once instead of failing the first
    step; the default there runs uncompiled."""
    if not compiles(spec):
        return 0
    missing = compiler_missing()
    if missing is not None:
        if spec.training.compile:
            message = (
                f"training.compile needs a C compiler and Python's headers where the trainer "
                f"runs, and {missing}: use an image that has them (the project's trainer image "
                "does), or set training.compile false"
            )
            raise ManifestError([FieldError("spec.training.compile", message)])
        log.info("torch.compile: off, %s (set training.compile false to say so)", missing)
        return 0
    dynamic = compiled_shapes_vary(spec)
    count = compile_layers(model, dynamic)
    log.info("torch.compile: %d transformer layers (dynamic shapes %s)", count, dynamic)
    return count


def compiled_shapes_vary(spec: FineTuneJobSpec) -> bool:
    """Whether the training batches' shapes vary: every packed causal-lm batch is
    batchSizePerDevice x maxSeqLength, the others are padded to their longest row."""
    return not (spec.model.task == "causal-lm" and spec.training.packing)


def layer_class_names(model: torch.nn.Module) -> set[str]:
    """The model's transformer layer classes: what transformers lists as never to be split
    across devices (`_no_split_modules`), as accelerate's transformer_based_wrap reads it."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer layers (decoder blocks, encoder layers), in order."""
    names = layer_class_names(model)
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: torch.nn.Module, dynamic: bool) -> int:
    """torch.compile every transformer layer in place; the number compiled. Regional
    compilation, as PyTorch's recipe does it: the layers of one class share one compiled graph,
    so the compile takes one layer's time, not the whole model's, and the layers keep their
    parameter names (checkpoints and saved weights are unchanged). `dynamic`: for batches whose
    shapes vary, one graph for any length at the first step, instead of a second compile at
    the first new shape, which the hang watchdog would time as a step."""
    layers = transformer_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic or None)
    return len(layers)


def lora_config(peft: PeftSpec, task_type: TaskType) -> LoraConfig:
    """The LoRA settings of a spec, for the task's peft `task_type`. Empty targetModules means
    every linear layer but the head, which is peft's "all-linear"; with TaskType.SEQ_CLS the
    classification head is trained in full (modules_to_save)."""
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=list(peft.target_modules) or "all-linear",
        task_type=task_type,
        use_rslora=peft.use_rslora,
        use_dora=peft.use_dora,
    )


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    location, revision = source_location(spec.source), pinned_revision(spec)
    # A model that is not there is ModelNotFound at once, not a retry (finetune_trainer.sources).
    with downloading("model", location, revision) as token:
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=revision, token=token, local_files_only=cached_only(spec)
        )
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


class BaseLoader:
    """A task's base model: its auto class with the spec's source, revision and the task's own
    arguments (e.g. the labels of a classification head) bound. Called with the dtype and
    quantization arguments, it is `from_pretrained`; `empty` builds it without its weights. A
    source that does not exist raises SourceNotFound."""

    def __init__(self, auto_class: Any, spec: ModelSpec, **task_kwargs: object) -> None:
        self._auto_class = auto_class
        self._location, self._revision = source_location(spec.source), pinned_revision(spec)
        self._task_kwargs = task_kwargs
        # Fetched into the hub cache (fetch.py): read there, with no Hub request.
        self._local = cached_only(spec)

    def __call__(self, **kwargs: Any) -> PreTrainedModel:
        cached: dict[str, Any] = {}
        if self._local:
            # The auto classes look for an adapter config without local_files_only: pass it.
            cached = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}
        with self._token() as token:
            return self._auto_class.from_pretrained(
                self._location,
                revision=self._revision,
                token=token,
                **cached,
                **self._task_kwargs,
                **kwargs,
            )

    def empty(self, dtype: torch.dtype) -> PreTrainedModel:
        """The base's shapes on the meta device, from its config alone: nothing reads or needs
        its weights (an fsdp rank other than 0, whose pod may hold the config without them:
        fetch.reads_base_weights). Its generation settings are the checkpoint's, as
        `from_pretrained` reads them, so that every rank generates alike."""
        from transformers import AutoConfig, GenerationConfig

        with self._token() as token:
            source = {"revision": self._revision, "token": token, "local_files_only": self._local}
            config = AutoConfig.from_pretrained(self._location, **source, **self._task_kwargs)
            with torch.device("meta"):
                model = self._auto_class.from_config(config, dtype=dtype)
            # Without generation_config.json (OSError), the one made from the config stays.
            with suppress(OSError):
                if model.can_generate():
                    model.generation_config = GenerationConfig.from_pretrained(
                        self._location, **source
                    )
        return model

    def _token(self) -> AbstractContextManager[str | None]:
        # The model's own token, never the push token when it has one (sources.downloading).
        return downloading("model", self._location, self._revision)


def load_model(
    spec: FineTuneJobSpec,
    load_base: BaseLoader,
    pad_token_id: int | None,
    task_type: TaskType,
    device: torch.device,
) -> PreTrainedModel:
    """The base model, wrapped for PEFT unless the method is `none`.

    `device` is where this rank computes; qlora quantizes the base as it loads, straight onto it.
    The meta device builds the model from its config, without its weights (an fsdp rank other
    than 0).
    """
    dtype = weights_dtype(spec.training.precision, spec.peft.method)
    kwargs: dict[str, object] = {"dtype": dtype}
    if spec.peft.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    model = (
        # The base's shapes without its weights (sharding.loading_device); nothing is read.
        load_base.empty(dtype) if device.type == "meta" else load_base(**kwargs)
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    checkpointing = gradient_checkpointing(spec)
    if spec.peft.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Non-reentrant checkpointing: the reentrant kind breaks DDP's gradient hooks on the
        # frozen 4-bit base (TRL passes the same for multi-GPU QLoRA).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        # Non-reentrant, as above; transformers also makes the embeddings' output require grad,
        # so that a frozen base passes gradients through the recomputed layers to LoRA's.
        model.activation_checkpointing_enable({"use_reentrant": False})
    if spec.peft.method == "none":
        return model
    # The revision goes into adapter_config.json, so that loading the adapter (PeftModel,
    # AutoPeftModel) fetches the base at the revision it was trained on, not at main. A half-
    # precision base gets fp32 LoRA weights (autocast_adapter_dtype), as TRL trains them.
    model = get_peft_model(
        model,
        lora_config(spec.peft, task_type),
        revision=pinned_revision(spec.model),
        autocast_adapter_dtype=True,
    )
    # What autocast_adapter_dtype leaves out (a classification head's trainable copy) too.
    trainable_in_fp32(model)
    return model


def trainable_in_fp32(model: torch.nn.Module) -> None:
    """Upcast the trainable weights of a half-precision base to fp32 in place, so that the
    optimizer never updates half-precision weights (diffusers' cast_training_params does the
    same); the frozen base stays at the precision it was loaded in."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _merged_at_full_precision(model: torch.nn.Module, load_base: BaseLoader) -> PreTrainedModel:
    """A QLoRA adapter merged into the base as the checkpoint stores it (e.g. bf16), on CPU.

    Merging into the 4-bit base would quantize the sum again and ship the quantization error
    with it; this is the QLoRA recipe (and TRL's merge script) instead: reload, then merge.
    """
    from peft import PeftModel

    base = load_base(dtype="auto")
    if base.config.pad_token_id is None:
        base.config.pad_token_id = model.config.pad_token_id  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as adapter:
        model.save_pretrained(adapter, save_embedding_layers=False)  # type: ignore[operator]
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def artifact_kind(spec: FineTuneJobSpec) -> Artifact:
    if spec.peft.method == "none":
        return "full"
    hub = spec.output.hub
    return "merged" if hub is not None and hub.merge else "adapter"


def save_artifact(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: FineTuneJobSpec,
    out: Path,
    load_base: BaseLoader,
) -> Artifact:
    """Save what gets pushed: the adapter, the merged model, or the fully tuned model.
    `load_base` reloads the base for a QLoRA merge; nothing else calls it."""
    kind = artifact_kind(spec)
    if kind == "merged" and spec.peft.method == "qlora":
        model = _merged_at_full_precision(model, load_base)
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
