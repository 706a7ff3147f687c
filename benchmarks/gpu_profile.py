"""Where a LoRA training step's GPU time goes, for the MFU of benchmarks/gpu_throughput.py.

    python benchmarks/gpu_profile.py                   # Llama-3.1-8B shape on a CUDA GPU
    python benchmarks/gpu_profile.py --shape test --device cpu --steps 2    # the code path

The step of this trainer on the benchmark's setting, without the trainer around it: the
shape's Llama (random init, bf16 weights), LoRA r=16 on every linear layer with fp32 adapter
weights (peft's autocast_adapter_dtype, as the trainer loads them), bf16 autocast, AdamW over
the adapters, `--rows` rows of `--seq-len` tokens per step. It times `--steps` steps after a
warm-up, then profiles 3 steps with torch.profiler and sums the device time by kind of kernel:
matrix products, attention, the loss, the optimizer and the rest (elementwise and norms).

Writes benchmarks/results/gpu_profile.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import contenders
from gpu_throughput import device_peak_tflops, model_flops_per_token

from finetune_trainer import modeling

HERE = Path(__file__).resolve().parent
# A kernel's kind by a part of its name (the first match wins); the rest is "other".
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("loss", ("nll_loss", "log_softmax", "cross_entropy", "softmax_backward")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "ampere", "mm_")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, parts in KINDS if any(p in low for p in parts)), "other")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(contenders.SHAPES), default="llama-3.1-8b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2, help="rows per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoder layer (regional compilation: one layer's graph, reused)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_profile.json")
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaForCausalLM

    shape = contenders.SHAPES[args.shape]
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    with torch.device(args.device):
        base = LlamaForCausalLM(contenders._llama_config(shape, args.seq_len, {}))
    base = base.to(torch.bfloat16)
    base.config.use_cache = False
    model = get_peft_model(base, contenders.lora_config(16), autocast_adapter_dtype=True)
    if args.compile:
        modeling.compile_layers(model, dynamic=False)  # as the trainer compiles them
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-4)
    ids = torch.randint(0, shape.vocab, (args.rows, args.seq_len), device=args.device)

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    for _ in range(2):
        step()
    sync()
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / args.steps
    tokens_per_second = args.rows * args.seq_len / seconds
    counts = contenders.parameter_counts(shape, 16)
    per_token = model_flops_per_token(counts, shape.layers, args.seq_len, shape.hidden)
    name, peak = device_peak_tflops(args.device, None)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    by_kind: dict[str, float] = defaultdict(float)
    kernels: list[tuple[str, float]] = []
    for event in prof.key_averages():
        # Device kernels on a GPU; on CPU (the code path only) the operators' own time.
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (cuda and not str(getattr(event, "device_type", "")).endswith("CUDA")):
            continue
        by_kind[kind_of(event.key)] += us / 3
        kernels.append((event.key, us / 3))
    total = sum(by_kind.values())
    report = {
        "model": f"{shape.name} shape (random init), bf16 weights, LoRA r=16 fp32, bf16 autocast",
        "device": name,
        "compiled": args.compile,
        "rows": args.rows,
        "seq_len": args.seq_len,
        "warmup_seconds_2_steps": round(warmup, 1),
        "seconds_per_step": round(seconds, 4),
        "tokens_per_second": round(tokens_per_second, 1),
        "mfu": round(per_token * tokens_per_second / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device_ms_per_step": round(total / 1e3, 1),
        "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items())},
        "top_kernels_ms_per_step": [
            [k[:120], round(us / 1e3, 2)] for k, us in sorted(kernels, key=lambda x: -x[1])[:25]
        ],
    }
    contenders.write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
