"""What a rank says when its device runs out of memory.

torch raises `OutOfMemoryError` when its CUDA caching allocator cannot get a block (the GPU is
full); when the host refuses memory (a node with strict overcommit, an address-space limit),
torch's CPU allocator raises a RuntimeError of its own and numpy or PIL a MemoryError. Without
such a refusal the kernel's OOM killer ends the container instead, which the operator reads as
OOMKilled. The same spec on the same devices reaches the same peak at the same step, so another
attempt would load the model, resume and fail again, holding the whole gang each time: the
verdict is permanent (reason `DeviceOutOfMemory`). Its message keeps torch's own account (what it
tried to allocate, the device's capacity and what was free), says where the rank was, and names
the fields that lower the peak there, with their values, each only where the spec's rules
(api/finetune_api/v1alpha1.py) would accept the change.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from finetune_api import phases
from finetune_api.v1alpha1 import (
    CAUSAL_LM,
    SEQUENCE_CLASSIFICATION,
    TEXT_TO_IMAGE,
    FineTuneJobSpec,
)
from finetune_trainer.modeling import gradient_checkpointing

# What torch's CPU allocator says when it gets no memory (c10/core/impl/alloc_cpu.cpp).
_CPU_ALLOCATOR = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says that an allocation failed, on a GPU or on the host."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and _CPU_ALLOCATOR in str(exc)


# torch's CUDA message ends with a pointer to its allocator notes: the fields are ours to name.
_TORCH_NOTE = " See documentation for Memory Management"


# Where in the attempt a rank ran out, from the phases its telemetry stamped: what lowers the
# peak differs (the weights while loading; the batch's activations while evaluating; both, and
# the gradients and optimizer state, while training; the merged copy while saving).
LOADING = "loading the model"
EVALUATING_BEFORE = "evaluating before training"
TRAINING = "training"
EVALUATING_AFTER = "evaluating after training"
SAVING = "saving the result"


def stage_of(stamps: Mapping[str, float]) -> str:
    """The stage a rank was in, from the phases it had reached (finetune_api.phases)."""
    if phases.MODEL_LOADED not in stamps:
        return LOADING
    if phases.EVALUATED_BEFORE not in stamps:
        return EVALUATING_BEFORE
    if phases.LAST_STEP not in stamps:
        return TRAINING
    if phases.EVALUATED_AFTER not in stamps:
        return EVALUATING_AFTER
    return SAVING


def out_of_memory_message(
    spec: FineTuneJobSpec, detail: str, world_size: int, stage: str = TRAINING
) -> str:
    """The failure message for torch's `detail` on a gang of `world_size` ranks."""
    account = detail.split(_TORCH_NOTE)[0].strip().rstrip(".")
    memory = "GPU" if spec.resources.accelerator.type == "nvidia.com/gpu" else "host"
    fixes = "; or ".join(lower_the_peak(spec, world_size, stage))
    return (
        f"a rank ran out of {memory} memory while {stage} ({account}); the same spec would run "
        f"out again, so no other attempt is made. To lower the peak: {fixes}"
    )


def lower_the_peak(spec: FineTuneJobSpec, world_size: int, stage: str = TRAINING) -> list[str]:
    """The changes that lower a rank's peak memory in `stage`, most direct first; the last is
    always more memory."""
    t, task, method = spec.training, spec.model.task, spec.peft.method
    gpu = spec.resources.accelerator.type == "nvidia.com/gpu"
    activations = stage in (EVALUATING_BEFORE, TRAINING, EVALUATING_AFTER)
    weights = stage in (LOADING, TRAINING)
    fixes = []
    if activations and t.batch_size_per_device > 1:
        fixes.append(
            f"halve spec.training.batchSizePerDevice ({t.batch_size_per_device}) and double "
            f"gradientAccumulationSteps ({t.gradient_accumulation_steps}), which keeps the "
            "global batch"
        )
    if activations and task == TEXT_TO_IMAGE:
        resolution = t.resolution or "the pipeline's own"
        fixes.append(f"lower spec.training.resolution ({resolution})")
    elif activations:
        fixes.append(f"lower spec.training.maxSeqLength ({t.max_seq_length})")
    if stage == TRAINING and not gradient_checkpointing(spec):
        fixes.append("set spec.training.gradientCheckpointing: true")
    if weights and gpu and t.precision == "fp32":
        fixes.append("set spec.training.precision: bf16 (half the bytes of a LoRA base)")
    shardable = task in (CAUSAL_LM, SEQUENCE_CLASSIFICATION) and t.precision != "fp16"
    if weights and shardable and t.strategy == "ddp" and method != "qlora":
        over = f"the {world_size} ranks" if world_size > 1 else "more ranks (resources.nodes)"
        fixes.append(
            f"set spec.training.strategy: fsdp, which shards the weights, gradients and "
            f"optimizer state over {over}"
        )
    if weights and method == "none":
        fixes.append("set spec.peft.method: lora, which trains a small fraction of the weights")
    elif weights and method == "lora" and gpu and task != TEXT_TO_IMAGE and t.strategy == "ddp":
        fixes.append("set spec.peft.method: qlora, which loads the base in 4 bits")
    if stage == SAVING and spec.output.hub is not None and spec.output.hub.merge:
        fixes.append(
            "set spec.output.hub.merge: false, which pushes the adapter: the merge holds a "
            "full-precision copy of the base"
        )
    more = "GPUs with more memory" if gpu else "more memory for the pod (resources.requests)"
    fixes.append(f"run on {more}")
    return fixes
