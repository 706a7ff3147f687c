"""Host memory of loading a base under training.strategy fsdp: only rank 0 reads the weights
(the others build the model empty and get their shards from it) against every rank reading them.

    HF_HUB_OFFLINE=1 python benchmarks/fsdp_loading.py [--shape smollm2-135m] [--ranks 4]

One pod's ranks (a gloo process group on this machine) load and shard a randomly initialised
`--shape` Llama saved in bf16, as Llamas are published, the way `finetune train` does
(finetune_trainer.testing.sharded_load), once each way, side by side, for two jobs:

- full-fine-tune (`peft.method: none`): fp32 master weights, so every rank that reads the base
  converts the whole of it into memory of its own;
- lora at bf16: the weights load at the file's dtype, and safetensors maps the file, so a rank
  pages in only what it touches, and the pod's ranks share those pages in the page cache.

The figure is each rank's peak resident memory by the end of sharding (the kernel's VmHWM:
loading is the peak), and the pod's sum of them, which overstates the shared file pages.
Writes benchmarks/results/fsdp_loading.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import contenders
import yaml
from contenders import SHAPES

from finetune_trainer.testing import sharded_load

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
MODES = ("rank_0_reads", "every_rank_reads")
CASES: dict[str, dict[str, Any]] = {
    "full_fine_tune": {"peft": {"method": "none"}, "training": {"precision": "bf16"}},
    "lora_bf16": {
        "peft": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"precision": "bf16"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=4, help="processes in the pod")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fsdp_loading.json")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    # The model is all that is built from it (bf16, positions for 512 tokens).
    setting = contenders.Setting(512, 1, 1, 16, "cpu", "bf16")
    runs: dict[tuple[str, str], list[list[int]]] = {
        (case, mode): [] for case in CASES for mode in MODES
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = contenders.build_assets(root, shape, setting, 8, (8, 16))
        weights = sum(f.stat().st_size for f in assets.model.glob("*.safetensors"))
        env = {**contenders.base_env(root), "OMP_NUM_THREADS": "1"}
        for case, change in CASES.items():
            job = root / f"{case}.yaml"
            job.write_text(yaml.safe_dump(_job(assets, change)))
            for round_ in range(args.repeats):
                for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                    out = root / f"{case}-{mode}-{round_}"
                    every = mode == "every_rank_reads"
                    reports = sharded_load.gang(
                        job, out, args.ranks, every_rank_loads=every, env=env
                    )
                    runs[case, mode].append([int(r["peakRss"]) for r in reports])
                    print(case, mode, [p // MIB for p in runs[case, mode][-1]], file=sys.stderr)
    report: dict[str, Any] = {
        "model": f"{shape.name} shape (random init), saved in bf16",
        "weights_mib": round(weights / MIB, 1),
        "ranks": args.ranks,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "unit": "peak resident memory (VmHWM) of each rank by the end of sharding, MiB; "
        "the pod's sum of them; the median over repeats",
    }
    for case, change in CASES.items():
        figures = {mode: _figure(runs[case, mode]) for mode in MODES}
        new, old = figures["rank_0_reads"], figures["every_rank_reads"]
        report[case] = {
            "job": change,
            **figures,
            "ratios": {
                "pod_sum": round(new["pod_mib"] / old["pod_mib"], 3),
                "other_ranks": round(new["other_ranks_mib"] / old["other_ranks_mib"], 3),
            },
            "other_ranks_saved_mib": round(old["other_ranks_mib"] - new["other_ranks_mib"], 1),
        }
    contenders.write_report(args.out, report)
    print(yaml.safe_dump(report, sort_keys=False))


def _job(assets: contenders.Assets, change: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "model": {"source": f"file://{assets.model}"},
        "dataset": {"source": f"file://{assets.data}"},
        "peft": change["peft"],
        "training": {"strategy": "fsdp", **change["training"]},
    }
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": spec,
    }


def _figure(samples: list[list[int]]) -> dict[str, Any]:
    """Per rank and summed over the pod, the median over the repeats, in MiB."""
    per_rank = [sorted(column)[len(column) // 2] / MIB for column in zip(*samples, strict=True)]
    others = per_rank[1:]
    return {
        "per_rank_mib": [round(x, 1) for x in per_rank],
        "rank_0_mib": round(per_rank[0], 1),
        "other_ranks_mib": round(sum(others) / len(others), 1),
        "pod_mib": round(sum(per_rank), 1),
    }


if __name__ == "__main__":
    main()
