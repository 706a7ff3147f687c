"""LoRA training throughput, MFU and peak memory on one GPU: this trainer against a plain
`transformers.Trainer` + peft script and TRL's `SFTTrainer` (benchmarks/contenders.py).

    HF_HUB_OFFLINE=1 python benchmarks/gpu_throughput.py            # Llama-3.1-8B shape, H200

A Llama-3.1-8B shape (random init from its config, no download), bf16 weights, LoRA r=16 on
every linear layer, documents packed to 4,096 tokens (padded to the longest row by the plain
Trainer), 2 rows (8,192 tokens) per step without gradient checkpointing, 30 steps: the loop
is timed from the end of its first step (warm-up and compiling) to the end of the last, the
same way for every contender. The
contenders run one after another, `--repeats` times interleaved; each figure is the median.
`--shape test --device cpu` runs the same code path in seconds; the test suite does.

MFU = model FLOPs per token x tokens/s / peak FLOP/s. Model FLOPs per token, as NVIDIA NeMo counts
a LoRA fine-tune (finetune_trainer.telemetry.flops_per_token):
    forward                 2 P    (every matmul parameter: the frozen base, LoRA and the head)
    backward, activations   2 P    (gradients flow through the frozen base to the adapters below)
    backward, weights       2 P_lora
    attention               12 L s d  (QK^T and AV: 4 L s d forward, 8 L s d backward; no causal
                                       discount; s = the packed length for every contender)
P counts every parameter a token multiplies: all but the input embedding's lookup (the head is
counted once, tied or not). The same per-token count for every contender, so their MFU ratios
are their throughput ratios. Peak FLOP/s: the dense bf16 figure of the device (H100/H200 SXM
989.4 TFLOP/s), or --peak-tflops.

Writes benchmarks/results/gpu_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, get_args

import contenders
from contenders import SHAPES, Contender, Sample

HERE = Path(__file__).resolve().parent
# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), by a part of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.05}
MFU_FORMULA = (
    "(2*P + 2*P + 2*P_lora + 12*L*s*d) FLOPs per token x tokens/s / peak FLOP/s; "
    "P = matmul parameters (all but the input embedding lookup; the head once), "
    "P_lora = trainable LoRA parameters, L layers, s = packed sequence length, d = hidden size"
)


def device_peak_tflops(device: str, given: float | None) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak: `given`, else from the table, else None."""
    if device != "cuda":
        return "cpu", given
    import torch

    name = torch.cuda.get_device_name(0)
    if given is not None:
        return name, given
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def model_flops_per_token(counts: dict[str, int], layers: int, seq_len: int, hidden: int) -> float:
    from finetune_trainer.telemetry import flops_per_token

    return flops_per_token(
        counts["matmul"], counts["trainable"], n_layers=layers, seq_length=seq_len, d_model=hidden
    )


def summarise(
    samples: dict[str, list[Sample]], per_token: float, peak: float | None
) -> dict[str, Any]:
    """Each contender's figures (the median of its runs so far) and this trainer's ratios."""
    results: dict[str, Any] = {}
    for c, runs in samples.items():
        if not runs:
            continue
        tps = statistics.median(s.tokens_per_second for s in runs)
        achieved = per_token * tps
        results[c] = {
            "tokens_per_second": round(tps, 1),
            "model_tflops_per_second": _significant(achieved / 1e12),
            "mfu": _significant(achieved / (peak * 1e12)) if peak else None,
            "peak_memory_gib": round(max(s.peak_memory_bytes for s in runs) / 2**30, 2),
            "samples_tokens_per_second": [round(s.tokens_per_second, 1) for s in runs],
        }
    ratios = {
        f"finetune_vs_{c}": round(
            results["finetune"]["tokens_per_second"] / results[c]["tokens_per_second"], 3
        )
        for c in results
        if c != "finetune" and "finetune" in results
    }
    return {"load_average_after": os.getloadavg(), "results": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    contenders.add_arguments(
        parser, shape="llama-3.1-8b", seq_len=4096, global_batch=2, steps=30, repeats=1
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--docs", type=int, default=0, help="documents; 0: enough for --steps")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak; default by its name")
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=get_args(Contender),
        default=list(get_args(Contender)),
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_throughput.json")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device (use --device cpu)")

    shape = SHAPES[args.shape]
    setting = contenders.setting_of(args, args.device, args.precision)
    # Documents of 1/16 to the whole packed length, about 3 rows' worth per packed row:
    # the packed contenders have enough tokens, the plain Trainer enough rows.
    words = (max(2, args.seq_len // 16), args.seq_len)
    docs = args.docs or 4 * args.global_batch * args.steps + 64
    name, peak = device_peak_tflops(args.device, args.peak_tflops)
    counts = contenders.parameter_counts(shape, args.lora_r)
    per_token = model_flops_per_token(counts, shape.layers, args.seq_len, shape.hidden)

    samples: dict[str, list[Sample]] = {c: [] for c in args.contenders}
    errors: dict[str, list[str]] = {}
    fixed = {
        "model": f"{shape.name} shape (random init), {args.precision} weights",
        "shape": shape.__dict__,
        "lora": f"r={args.lora_r}, alpha={2 * args.lora_r}, all linear layers",
        "device": name,
        "peak_tflops": peak,
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "parameters": counts,
        "model_flops_per_token": per_token,
        "mfu_formula": MFU_FORMULA,
        "unit": "real (non-pad) tokens per second of the training loop after its first step; "
        "median of the repeats",
        "peak_memory": contenders.PEAK_MEMORY,
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = contenders.build_assets(root, shape, setting, docs, words)
        base = contenders.base_env(root)
        for _ in range(args.repeats):  # interleaved: drift hits every contender alike
            for c in args.contenders:
                try:
                    samples[c].append(contenders.run(c, root, assets, setting, 1, base))
                    print(c, samples[c][-1], file=sys.stderr, flush=True)
                except RuntimeError as exc:  # a failed contender leaves the others' figures
                    errors.setdefault(c, []).append(str(exc)[-2000:])
                    print(exc, file=sys.stderr, flush=True)
                # Written after every run: a run cut short still leaves what it measured.
                report = {**fixed, **summarise(samples, per_token, peak), "errors": errors}
                contenders.write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
