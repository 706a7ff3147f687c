"""Training throughput of `finetune train` against a plain `transformers.Trainer` + peft script.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/trainer_throughput.py

Both train the same randomly initialised Llama (built here, no download) with the same LoRA
config, data (documents of uneven length), global batch and number of optimizer steps, at 1 and
2 ranks; each rank is its own process, started with the env a pod gets (RANK, WORLD_SIZE,
MASTER_*), and the threads are split evenly between ranks. Throughput is real (non-pad) tokens
processed per second of the training loop, summed over ranks, counted the same way for both: the
attention mask of every training micro-batch. This trainer runs with packing (its default) and
without, so the effect of packing and of the loop itself can be told apart. Each figure is the
median of --repeats runs, interleaved so that drifting load on a shared machine hits all three
alike; the samples and the load average are kept in the JSON.

Writes benchmarks/results/trainer_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SEQ_LEN = 128
GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_assets(root: Path) -> tuple[Path, Path]:
    """A 4-layer Llama (hidden 128), a BPE tokenizer, and 2000 documents of 5-150 words."""
    from finetune_trainer.testing.tiny import WORDS, save_tiny_model

    rng = random.Random(0)
    # The shared words, in the order this benchmark has always drawn them from.
    words = ["alpha", "beta", "gamma", "delta", *WORDS[9:], *WORDS[:9]]
    docs = [" ".join(rng.choices(words, k=rng.randint(5, 150))) for _ in range(2000)]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model_dir = save_tiny_model(
        root / "model",
        docs,
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=344,
        layers=4,
        heads=4,
        max_positions=SEQ_LEN,
    )
    return model_dir, data


def _rank_envs(world: int, base: dict[str, str]) -> list[dict[str, str]]:
    port = str(_free_port())
    threads = str(max(1, (os.cpu_count() or 1) // world))
    return [
        {
            **base,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "NODE_RANK": str(r),
            "NNODES": str(world),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": threads,
        }
        for r in range(world)
    ]


def run_finetune(
    root: Path, model: Path, data: Path, world: int, steps: int, packing: bool, base: dict[str, str]
) -> float:
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": f"file://{model}"},
            "dataset": {"source": f"file://{data}", "evalFraction": 0.01},
            "peft": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {
                "maxSteps": steps,
                "batchSizePerDevice": GLOBAL_BATCH // world,
                "maxSeqLength": SEQ_LEN,
                "packing": packing,
                "checkpointEverySteps": 100000,
                "precision": "fp32",
            },
            "evaluation": {"maxSamples": 8},
            "resources": {"nodes": world},
        },
    }
    work = Path(tempfile.mkdtemp(dir=root))
    manifest = work / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    procs = []
    for env in _rank_envs(world, base):
        env.update(
            FINETUNE_RESULT_FILE=str(work / f"result-{env['RANK']}.json"),
            FINETUNE_CHECKPOINT_DIR=str(work / "ckpt"),
            FINETUNE_OUTPUT_DIR=str(work / "out"),
            FINETUNE_METRICS_PORT="0",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "finetune_cli", "train", str(manifest)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    if any(p.wait() for p in procs):
        raise RuntimeError(f"finetune train failed at world size {world}; see {work}")
    return float(json.loads((work / "result-0.json").read_text())["tokensPerSecond"])


def run_baseline(
    root: Path, model: Path, data: Path, world: int, steps: int, base: dict[str, str]
) -> float:
    out = root / f"baseline-{world}.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--baseline-rank",
                str(model),
                str(data),
                str(steps),
                str(out),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for env in _rank_envs(world, base)
    ]
    if any(p.wait() for p in procs):
        raise RuntimeError(f"the Trainer baseline failed at world size {world}")
    return float(json.loads(out.read_text())["tokens_per_second"])


def baseline_rank(model_dir: str, data: str, steps: int, out: str) -> None:
    """One rank of the plain script: Trainer + peft, padding to the longest row in a batch."""
    import torch
    import torch.distributed as dist
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    world = int(os.environ["WORLD_SIZE"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=data)["train"]
    ds = ds.map(
        lambda b: tokenizer(
            [t + tokenizer.eos_token for t in b["text"]], truncation=True, max_length=SEQ_LEN
        ),
        batched=True,
        remove_columns=["text"],
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    counted = {"tokens": 0}

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collator(rows)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            clock["end"] = time.perf_counter()

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        learning_rate=2e-4,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        dataloader_drop_last=True,
        seed=42,
        # gloo needs a process group, which Trainer only creates when there are peers.
        **({"ddp_backend": "gloo"} if world > 1 else {}),
    )
    Trainer(
        model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]
    ).train()
    tokens = torch.tensor(counted["tokens"], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(tokens)
    if int(os.environ["RANK"]) == 0:
        seconds = clock["end"] - clock["start"]
        Path(out).write_text(json.dumps({"tokens_per_second": int(tokens) / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per figure; the median is kept"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trainer_throughput.json")
    parser.add_argument("--baseline-rank", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_rank:
        model, data, steps, out = args.baseline_rank
        baseline_rank(model, data, int(steps), out)
        return
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "FINETUNE_"))}
    base.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    report: dict[str, Any] = {
        "model": "Llama 4 layers, hidden 128 (random init)",
        "lora": "r=8, all-linear",
        "global_batch": GLOBAL_BATCH,
        "max_seq_length": SEQ_LEN,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "unit": "real (non-pad) tokens per second, all ranks; median of the repeats",
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = build_assets(root)
        report["load_average_before"] = os.getloadavg()
        for world in (1, 2):
            samples: dict[str, list[float]] = {"packed": [], "unpacked": [], "trainer": []}
            # Interleaved repeats: on a shared machine the load drifts between runs.
            for _ in range(args.repeats):
                samples["packed"].append(
                    run_finetune(root, model, data, world, args.steps, True, base)
                )
                samples["unpacked"].append(
                    run_finetune(root, model, data, world, args.steps, False, base)
                )
                samples["trainer"].append(run_baseline(root, model, data, world, args.steps, base))
            ours, unpacked, baseline = (statistics.median(samples[k]) for k in samples)
            report["results"][f"ranks_{world}"] = {
                "finetune_tokens_per_second": round(ours, 1),
                "finetune_unpacked_tokens_per_second": round(unpacked, 1),
                "transformers_trainer_tokens_per_second": round(baseline, 1),
                "ratio": round(ours / baseline, 3),
                "ratio_unpacked": round(unpacked / baseline, 3),
                "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
            }
            print(world, report["results"][f"ranks_{world}"], flush=True)
        report["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
