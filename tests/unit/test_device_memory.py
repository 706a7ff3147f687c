"""DeviceOutOfMemory: which errors are torch's allocator running out, and the changes its message
suggests, each of which the spec's own rules must accept."""

from __future__ import annotations

import re
from typing import Any

import pytest

from finetune_api import parse_manifest
from finetune_api.constants import Reason
from finetune_api.result import TrainerResult
from finetune_api.v1alpha1 import FineTuneJobSpec

torch = pytest.importorskip("torch")

from finetune_trainer.device_memory import (  # noqa: E402
    EVALUATING_AFTER,
    EVALUATING_BEFORE,
    LOADING,
    SAVING,
    TRAINING,
    is_out_of_memory,
    lower_the_peak,
    out_of_memory_message,
    stage_of,
)

GPU = {"type": "nvidia.com/gpu", "count": 2}
# What torch 2.x says on a full GPU (CUDACachingAllocator.cpp), figures included.
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 3.91 GiB. GPU 0 has a total capacity of 139.72 GiB "
    "of which 1.02 GiB is free. Including non-PyTorch memory, this process has 138.69 GiB memory "
    "in use. Of the allocated memory 130.12 GiB is allocated by PyTorch, and 6.91 GiB is "
    "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try "
    "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
    "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
    "#environment-variables)"
)


def _spec(**sections: dict[str, Any]) -> FineTuneJobSpec:
    spec: dict[str, Any] = {
        "model": {"source": "hf://org/base"},
        "dataset": {"source": "hf://org/data"},
        "resources": {"nodes": 2, "processesPerNode": 2, "accelerator": GPU},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    return parse_manifest({"metadata": {"name": "oom"}, "spec": spec}).spec


def test_torch_allocator_errors_are_out_of_memory_and_others_are_not() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    cpu = (
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert is_out_of_memory(RuntimeError(cpu))
    assert is_out_of_memory(MemoryError("Unable to allocate 192. MiB for an array"))
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(ValueError(cpu))


def test_device_out_of_memory_is_permanent() -> None:
    result = TrainerResult(status="Failed", reason=Reason.DEVICE_OUT_OF_MEMORY)
    assert result.permanent


def test_the_message_keeps_torchs_figures_and_names_the_fields_with_their_values() -> None:
    spec = _spec(training={"batchSizePerDevice": 8, "maxSeqLength": 4096})
    message = out_of_memory_message(spec, CUDA_OOM, world_size=4)
    assert message.startswith(
        "a rank ran out of GPU memory while training (CUDA out of memory. Tried to "
    )
    assert "1.02 GiB is free" in message and "Memory Management" not in message
    assert "batchSizePerDevice (8)" in message and "maxSeqLength (4096)" in message
    assert "over the 4 ranks" in message


_SET = re.compile(r"set spec\.([\w.]+): (\w+)")


@pytest.mark.parametrize(
    ("sections", "expected", "absent"),
    [
        ({}, ["gradientCheckpointing", "strategy: fsdp", "method: qlora"], ["precision"]),
        ({"training": {"precision": "fp32"}}, ["precision: bf16"], []),
        ({"peft": {"method": "none"}}, ["method: lora", "strategy: fsdp"], ["qlora"]),
        ({"peft": {"method": "qlora"}}, ["batchSizePerDevice"], ["gradientCheckpointing", "fsdp"]),
        ({"training": {"strategy": "fsdp"}}, ["maxSeqLength"], ["strategy: fsdp", "qlora"]),
        ({"training": {"precision": "fp16"}}, ["method: qlora"], ["fsdp"]),
        ({"training": {"batchSizePerDevice": 1}}, ["maxSeqLength"], ["batchSizePerDevice"]),
        (
            {"resources": {"accelerator": {"type": "cpu"}}},
            ["gradientCheckpointing", "strategy: fsdp"],
            ["qlora", "precision"],
        ),
        (
            {"model": {"task": "sentence-embedding"}},
            ["maxSeqLength", "gradientCheckpointing"],
            ["fsdp"],
        ),
        (
            {"model": {"task": "text-to-image"}, "dataset": {"imageField": "image"}},
            ["resolution (the pipeline's own)", "gradientCheckpointing"],
            ["maxSeqLength", "fsdp", "qlora"],
        ),
    ],
)
def test_every_suggested_change_is_one_the_spec_accepts(
    sections: dict[str, dict[str, Any]], expected: list[str], absent: list[str]
) -> None:
    spec = _spec(**sections)
    fixes = lower_the_peak(spec, world_size=4)
    text = "; ".join(fixes)
    for fragment in expected:
        assert fragment in text, text
    for fragment in absent:
        assert fragment not in text, text
    _accepted(spec, fixes)


def _accepted(spec: FineTuneJobSpec, fixes: list[str]) -> None:
    """Each `set spec.a.b: value` in `fixes`, applied alone, gives a spec the rules (the schema
    and CEL's twins) accept."""
    for fix in fixes:
        for path, value in _SET.findall(fix):
            *parents, field = path.split(".")
            changed = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
            owner = changed
            for part in parents:
                owner = owner[part]
            owner[field] = {"true": True, "false": False}.get(value, value)
            parse_manifest({"metadata": {"name": "oom"}, "spec": changed})


def test_the_stage_decides_what_lowers_the_peak() -> None:
    stamps = ["process_started", "model_loaded", "evaluated_before", "last_step", "evaluated_after"]
    got = [stage_of(dict.fromkeys(stamps[:n], 1.0)) for n in range(1, 6)]
    assert got == [LOADING, EVALUATING_BEFORE, TRAINING, EVALUATING_AFTER, SAVING]
    spec = _spec(output={"hub": {"repo": "org/out", "merge": True, "endpoint": "http://hub"}})
    by_stage = {stage: "; ".join(lower_the_peak(spec, 4, stage)) for stage in got}
    # Loading holds the weights only: no batch, sequence or checkpointing can help.
    assert "strategy: fsdp" in by_stage[LOADING] and "qlora" in by_stage[LOADING]
    assert "batchSizePerDevice" not in by_stage[LOADING]
    # Evaluating holds a batch's activations, with no gradients or optimizer state.
    for stage in (EVALUATING_BEFORE, EVALUATING_AFTER):
        assert "batchSizePerDevice" in by_stage[stage] and "maxSeqLength" in by_stage[stage]
        assert "fsdp" not in by_stage[stage] and "gradientCheckpointing" not in by_stage[stage]
    assert "gradientCheckpointing" in by_stage[TRAINING] and "fsdp" in by_stage[TRAINING]
    # Saving a merged model holds a full-precision base beside it.
    assert "output.hub.merge: false" in by_stage[SAVING]
    assert all(text.endswith("run on GPUs with more memory") for text in by_stage.values())
    for stage in got:
        _accepted(spec, lower_the_peak(spec, 4, stage))
