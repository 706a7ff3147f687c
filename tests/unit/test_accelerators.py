"""The pure parts of issue #12: which accelerators a pod can drive, the dtype the base weights
load in, and gradient checkpointing's default. No torch device is touched here."""

from __future__ import annotations

import pytest

from finetune_api import parse_manifest
from finetune_api.constants import Reason
from finetune_api.pod import PERMANENT_EXIT_CODES
from finetune_api.result import TrainerResult
from finetune_api.v1alpha1 import ResourcesSpec

torch = pytest.importorskip("torch")

from finetune_trainer.accelerators import accelerator_problem  # noqa: E402
from finetune_trainer.modeling import compiles, gradient_checkpointing, weights_dtype  # noqa: E402

TPU = {"type": "google.com/tpu", "count": 4, "tpu": {"accelerator": "tpu-v5", "topology": "2x2"}}


def _resources(accelerator: dict[str, object], ranks: int = 1) -> ResourcesSpec:
    return ResourcesSpec.model_validate({"processesPerNode": ranks, "accelerator": accelerator})


@pytest.mark.parametrize(
    ("accelerator", "ranks", "cuda_devices", "fragment"),
    [
        ({"type": "cpu"}, 4, 0, None),
        ({"type": "nvidia.com/gpu", "count": 2}, 2, 2, None),
        ({"type": "nvidia.com/gpu", "count": 8}, 2, 8, None),
        ({"type": "nvidia.com/gpu", "count": 1}, 1, 0, "no CUDA device"),
        ({"type": "nvidia.com/gpu", "count": 4}, 4, 2, "only 2 CUDA device(s)"),
        (TPU, 1, 0, "no XLA runtime"),
        (TPU, 1, 8, "no XLA runtime"),
    ],
)
def test_accelerator_problem(accelerator, ranks, cuda_devices, fragment):
    problem = accelerator_problem(_resources(accelerator, ranks), cuda_devices)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem


def test_accelerator_unavailable_is_permanent():
    result = TrainerResult(status="Failed", reason=Reason.ACCELERATOR_UNAVAILABLE)
    assert result.exit_code in PERMANENT_EXIT_CODES
    assert result.permanent


@pytest.mark.parametrize(
    ("precision", "method", "bf16_hardware", "dtype"),
    [
        ("auto", "lora", True, torch.bfloat16),  # a GPU with bf16
        ("auto", "lora", False, torch.float32),  # CPU, or a GPU without bf16
        ("bf16", "lora", False, torch.bfloat16),
        ("fp16", "lora", True, torch.float16),
        ("fp32", "lora", True, torch.float32),
        # Weights the optimizer updates stay fp32 (autocast computes in half precision).
        ("bf16", "none", True, torch.float32),
        # QLoRA's base is 4-bit; the rest is upcast by peft's k-bit preparation.
        ("bf16", "qlora", True, torch.float32),
    ],
)
def test_weights_dtype(precision, method, bf16_hardware, dtype):
    assert weights_dtype(precision, method, bf16_hardware) is dtype


@pytest.mark.parametrize(
    ("method", "configured", "on"),
    [
        ("qlora", None, True),
        ("lora", None, False),
        ("none", None, False),
        ("lora", True, True),
        ("qlora", False, False),
    ],
)
def test_gradient_checkpointing_default_is_on_for_qlora_only(method, configured, on):
    resources = {"accelerator": {"type": "nvidia.com/gpu", "count": 1}}
    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gc"},
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"source": "hf://org/data"},
            "peft": {"method": method},
            "training": {"gradientCheckpointing": configured},
            "resources": resources,
        },
    }
    assert gradient_checkpointing(parse_manifest(doc).spec) is on


@pytest.mark.parametrize(
    ("task", "accelerator", "method", "configured", "on"),
    [
        ("causal-lm", "nvidia.com/gpu", "lora", None, True),
        ("causal-lm", "nvidia.com/gpu", "none", None, True),
        # bitsandbytes' 4-bit kernels are opaque to the compiler.
        ("causal-lm", "nvidia.com/gpu", "qlora", None, False),
        # FSDP with compiled layers has not run on a GPU here: only when asked for.
        ("causal-lm", "nvidia.com/gpu-fsdp", "lora", None, False),
        ("causal-lm", "nvidia.com/gpu-fsdp", "lora", True, True),
        # On CPU the compile costs more than it saves on short jobs; measured only for LMs.
        ("causal-lm", "cpu", "lora", None, False),
        ("sequence-classification", "nvidia.com/gpu", "lora", None, False),
        ("causal-lm", "cpu", "lora", True, True),
        ("causal-lm", "nvidia.com/gpu", "lora", False, False),
    ],
)
def test_compile_default_is_on_for_language_models_on_gpus(
    task, accelerator, method, configured, on
):
    accelerator, _, strategy = accelerator.partition("-")
    count = {"count": 1} if accelerator != "cpu" else {}
    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "compile"},
        "spec": {
            "model": {"source": "hf://org/model", "task": task}
            | ({"numLabels": 2} if task == "sequence-classification" else {}),
            "dataset": {"source": "hf://org/data"},
            "peft": {"method": method},
            "training": {"compile": configured, "strategy": strategy or "ddp"},
            "resources": {"accelerator": {"type": accelerator, **count}},
        },
    }
    assert compiles(parse_manifest(doc).spec) is on
