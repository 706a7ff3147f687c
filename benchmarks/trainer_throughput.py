"""CPU training throughput of `finetune train` against `transformers.Trainer` + peft and TRL's
`SFTTrainer` on a realistic shape, and this trainer's scaling from 1 to 2 ranks.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/trainer_throughput.py

(a) A SmolLM2-135M-shaped Llama (random init from its config, no download), sequences of 512,
LoRA r=16 on every linear layer, the same documents and global batch for all three
(benchmarks/contenders.py says what each runs and how tokens and time are counted): this
trainer packed, the plain Trainer padded per micro-batch, TRL with its default packing.
(b) This trainer at 1 and at 2 ranks with the same global batch, the 2 cores split evenly.

Figures are real (non-pad) tokens per second of the training loop, all ranks; each is the
median of --repeats runs, interleaved (one of each contender per round, every other round in
reverse order) so that the drifting load of a shared machine hits all alike. The samples, with
the 1-minute load average when each started, and each round's ratios stay in the JSON.
Run it on a quiet machine: a rank of two threads on oversubscribed cores slows down several
times more than the reference scripts do, and the ratios then measure the load.

Writes benchmarks/results/trainer_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import contenders
from contenders import SHAPES, Contender, Sample

HERE = Path(__file__).resolve().parent
# (contender, ranks) in the order each round runs them.
RUNS: tuple[tuple[Contender, int], ...] = (
    ("finetune", 1),
    ("trainer", 1),
    ("trl", 1),
    ("finetune", 2),
)
GOALS = {"finetune_vs_trl": 1.2, "finetune_vs_trainer": 1.6, "scaling_2_ranks": 1.08}


def _median(runs: list[Sample]) -> float:
    return statistics.median(s.tokens_per_second for s in runs)


def _figure(runs: list[Sample]) -> dict[str, Any]:
    return {
        "tokens_per_second": round(_median(runs), 1),
        "peak_memory_gib": round(max(s.peak_memory_bytes for s in runs) / 2**30, 2),
        "samples": [
            {
                "tokens_per_second": round(s.tokens_per_second, 1),
                "load_average": s.load_average,
                "padding_share": round(s.padding, 3),
            }
            for s in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 16 steps, 15 timed: the plain Trainer's padding depends on which documents share a
    # micro-batch, and every run draws the same ones (a fixed seed); a few steps make its
    # figure the luck of those draws (the JSON keeps each run's padding share).
    contenders.add_arguments(
        parser, shape="smollm2-135m", seq_len=512, global_batch=2, steps=16, repeats=3
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trainer_throughput.json")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    setting = contenders.setting_of(args, "cpu", "fp32")
    samples: dict[tuple[Contender, int], list[Sample]] = {run: [] for run in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Documents of 1/16 to the whole sequence: padding costs the plain Trainer what it costs.
        docs = 4 * args.global_batch * args.steps + 100
        assets = contenders.build_assets(
            root, shape, setting, docs, (args.seq_len // 16, args.seq_len)
        )
        base = contenders.base_env(root)
        load_before = os.getloadavg()
        for round_ in range(args.repeats):
            # Every other round backwards (ABBA): a steady drift in load then cancels out.
            for contender, world in RUNS if round_ % 2 == 0 else RUNS[::-1]:
                sample = contenders.run(contender, root, assets, setting, world, base)
                samples[contender, world].append(sample)
                print(contender, world, sample, file=sys.stderr, flush=True)
        load_after = os.getloadavg()

    ours, one, two = (
        _median(samples[r]) for r in (("finetune", 1), ("finetune", 1), ("finetune", 2))
    )
    measured = {
        "finetune_vs_trl": round(ours / _median(samples["trl", 1]), 3),
        "finetune_vs_trainer": round(ours / _median(samples["trainer", 1]), 3),
        "scaling_2_ranks": round(two / one, 3),
    }
    pairs = {
        "finetune_vs_trl": (("finetune", 1), ("trl", 1)),
        "finetune_vs_trainer": (("finetune", 1), ("trainer", 1)),
        "scaling_2_ranks": (("finetune", 2), ("finetune", 1)),
    }
    per_round = {
        name: [
            round(a.tokens_per_second / b.tokens_per_second, 3)
            for a, b in zip(samples[num], samples[den], strict=True)
        ]
        for name, (num, den) in pairs.items()
    }
    report = {
        "model": f"{shape.name} shape (random init), fp32",
        "shape": shape.__dict__,
        "lora": f"r={args.lora_r}, alpha={2 * args.lora_r}, all linear layers",
        "max_seq_length": args.seq_len,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "unit": "real (non-pad) tokens per second of the training loop after its first step, "
        "all ranks; median",
        "contenders": {
            "finetune": "finetune train, packed (maxSeqLength blocks)",
            "trainer": "transformers.Trainer + peft, padded to the longest row per micro-batch",
            "trl": "trl.SFTTrainer, packing=True (bfd, padding-free), TRL's defaults "
            "(gradient checkpointing on)",
        },
        "peak_memory": contenders.PEAK_MEMORY,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "realistic": {
            "ranks": 1,
            **{c: _figure(samples[c, 1]) for c in ("finetune", "trainer", "trl")},
        },
        "scaling": {
            "ranks_1": _figure(samples["finetune", 1]),
            "ranks_2": _figure(samples["finetune", 2]),
        },
        "ratios": measured,
        "ratios_per_round": per_round,
        "goals": GOALS,
    }
    contenders.write_report(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
