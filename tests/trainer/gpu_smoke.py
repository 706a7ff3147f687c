"""GPU smoke check, for a machine with CUDA (not collected by pytest: no test_ prefix).

    PYTHONPATH=api:operator:trainer:cli python tests/trainer/gpu_smoke.py OUT_DIR
    python tests/trainer/gpu_smoke.py --help

What a CPU machine cannot show, in one run of `finetune run` per variant on the tiny model of
the test fixtures:

- lora-auto: precision auto picks bf16 on a GPU that has it, and the base loads in bf16;
- lora-bf16: precision bf16 asked for explicitly, LoRA weights in fp32; both compiled
  (training.compile's default on a GPU), and lora-bf16-eager the same uncompiled;
- qlora: the 4-bit base through bitsandbytes' CUDA kernels (where bitsandbytes is installed),
  gradient checkpointing on by default; with 2 ranks (NCCL) where 2 GPUs are visible, else 1;
- fsdp-lora and fsdp-full: training.strategy fsdp on the visible GPUs (NCCL), LoRA and a full
  fine-tune (its layers checkpointed), bf16 compute over fp32 shards; fsdp-lora-compiled with
  compiled layers (DoRA under fsdp is not a variant: the CPU suite trains it, a hand run did
  in bf16, and the variants already take most of hack/gpu-checks.sh's 240 s for the smoke);
- ddp-lora-bf16-multi (2+ GPUs only): processesPerNode 2 under DDP and NCCL;
- sdxl-fp16: text-to-image on a tiny SDXL pipeline in fp16 with its VAE kept fp32 (the recipe's
  mix, which a CPU cannot run in fp16) and the samples drawn under autocast, random crops and
  mirrors as in diffusers' SDXL recipe; sdxl-fp16-vae the same with a VAE of its own
  (model.vae, as examples/sdxl-lora-gpu.yaml gives the fp16-fix VAE), which runs in fp16 too;
- embedding-bf16-cached: sentence-embedding in bf16 with gradient caching
  (training.cachedMiniBatchSize, as examples/bge-matryoshka-gpu.yaml trains BGE): the mini-batches
  replay their CUDA random state and take their gradients under autocast;
- oom: a text-to-image job at 4096 x 4096 pixels, whose batch cannot fit a GPU's memory, must
  end at once as DeviceOutOfMemory (exit code 3, torch's CUDA account in the message): its
  exit counts as a pass only with that reason.

Without CUDA it prints why it skips and exits 0 (or 1 with --require-gpu): never a silent pass.
Each run's result JSON and log land in OUT_DIR, and a summary (exit codes, wall seconds, the
trainer's result: loss, tokens per second, scores) is written to
benchmarks/results/gpu_smoke.json (another path with --summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import trainer_helpers  # noqa: E402

REPO = HERE.parent.parent
SUMMARY = REPO / "benchmarks" / "results" / "gpu_smoke.json"


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the tiny test model on the GPUs of this machine in each variant "
        "that only a GPU can check (bf16 loading, qlora, FSDP and DDP over NCCL).",
    )
    parser.add_argument("out", type=Path, help="folder for each run's manifest, log and result")
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="where the JSON goes")
    parser.add_argument(
        "--require-gpu", action="store_true", help="exit 1 instead of 0 when CUDA is absent"
    )
    parser.add_argument("--timeout", type=int, default=400, help="seconds per variant")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run these variants only")
    return parser.parse_args(argv)


def variants(gpus: int, bitsandbytes: bool) -> dict[str, dict[str, Any]]:
    """Each variant's spec changes, for `gpus` visible GPUs."""
    ranks = min(gpus, 2)

    def on(n: int) -> dict[str, Any]:
        accelerator = {"type": "nvidia.com/gpu", "count": n}
        return {"resources": {"nodes": 1, "processesPerNode": n, "accelerator": accelerator}}

    out: dict[str, dict[str, Any]] = {
        # training.compile's default compiles these two (a causal LM on a GPU, under DDP).
        "lora-auto": {**on(1), "training": {"precision": "auto"}},
        "lora-bf16": {**on(1), "training": {"precision": "bf16"}},
        "lora-bf16-eager": {**on(1), "training": {"precision": "bf16", "compile": False}},
    }
    if bitsandbytes:
        out[f"qlora-{ranks}rank"] = {**on(ranks), "peft": {"method": "qlora"}}
    out |= {
        "fsdp-lora": {**on(ranks), "training": {"strategy": "fsdp", "precision": "bf16"}},
        # Not compiled by default: asked for here, so that a GPU run checks it.
        "fsdp-lora-compiled": {
            **on(ranks),
            "training": {"strategy": "fsdp", "precision": "bf16", "compile": True},
        },
        "fsdp-full": {
            **on(ranks),
            "peft": {"method": "none"},
            "training": {
                "strategy": "fsdp",
                "precision": "bf16",
                "learningRate": 1e-3,
                "gradientCheckpointing": True,
            },
        },
    }
    if gpus >= 2:
        out["ddp-lora-bf16-2rank"] = {**on(2), "training": {"precision": "bf16"}}
    return out


def _run(name: str, doc: dict[str, Any], out: Path, timeout: int) -> dict[str, Any]:
    manifest = out / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(out / "hf-home")
    cmd = [sys.executable, "-m", "finetune_cli", "run", str(manifest), "--workdir", str(out / name)]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, log = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = -1, (exc.stderr or b"").decode(errors="replace") + "\nTIMEOUT"
    seconds = time.monotonic() - started
    (out / f"{name}.log").write_text(log)
    result_file = out / name / "node-0" / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    notes = [
        line
        for line in log.splitlines()
        if any(k in line for k in ("rank 0 of", "weights load", "torch.compile", "Error"))
    ]
    print(f"{name}: exit {code} in {seconds:.0f}s", flush=True)
    print("\n".join(notes[-8:]), flush=True)
    return {"exit": code, "seconds": round(seconds, 1), "result": result, "notes": notes[-8:]}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_smoke: SKIPPED, no CUDA device is visible to torch "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): nothing was checked",
            file=sys.stderr,
        )
        return 1 if args.require_gpu else 0
    from finetune_trainer.testing.tiny import causal_job, save_test_llama, save_test_text

    try:
        import bitsandbytes  # noqa: F401

        bnb = True
    except ImportError:
        print("bitsandbytes not installed: qlora skipped", file=sys.stderr)
        bnb = False
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    assets = out / "assets"
    assets.mkdir(exist_ok=True)
    base = causal_job(save_test_llama(assets / "tiny-llama"), save_test_text(assets / "text.jsonl"))
    gpus = torch.cuda.device_count()
    machine = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "bf16": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for name, change in variants(gpus, bnb).items():
        if args.only and name not in args.only:
            continue
        runs[name] = _run(
            name, trainer_helpers.deep_update(base, {"spec": change}), out, args.timeout
        )
        # Written after every variant: a machine lent for minutes may stop before the last.
        args.summary.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
    sdxl = [name for name in (SDXL, SDXL_VAE) if not args.only or name in args.only]
    if sdxl:
        from finetune_trainer.testing.diffusion import save_shapes_dataset
        from finetune_trainer.testing.diffusion_xl import save_tiny_xl_pipeline

        pipeline = save_tiny_xl_pipeline(assets / "sdxl-pipe")
        data = save_shapes_dataset(assets / "sdxl-data", train=16, test=8)
        for name in sdxl:
            # The pipeline's own VAE folder, given as a VAE of its own: it then runs in fp16.
            vae = pipeline / "vae" if name == SDXL_VAE else None
            runs[name] = _run(name, sdxl_job(pipeline, data, vae), out, args.timeout)
            summary = {"machine": machine, "runs": runs}
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if not args.only or EMBEDDING in args.only:
        runs[EMBEDDING] = _run(EMBEDDING, embedding_cached_job(assets), out, args.timeout)
        args.summary.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
    if not args.only or OOM in args.only:
        runs[OOM] = _run(OOM, _oom_job(assets, gpus=1), out, args.timeout)
        reason = (runs[OOM]["result"] or {}).get("reason")
        runs[OOM]["expected"] = reason == "DeviceOutOfMemory" and runs[OOM]["exit"] == 3
        args.summary.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
    print(f"summary: {args.summary}")
    return max((_exit_of(r) for r in runs.values()), default=0)


def _exit_of(run: dict[str, Any]) -> int:
    """A variant's share of the script's exit code: its own, or for one that must fail (oom),
    0 when it failed as it must and 1 otherwise."""
    if "expected" in run:
        return 0 if run["expected"] else 1
    return abs(int(run["exit"]))


OOM, SDXL, SDXL_VAE = "oom", "sdxl-fp16", "sdxl-fp16-vae"
EMBEDDING = "embedding-bf16-cached"


def sdxl_job(pipeline: Path, data: Path, vae: Path | None = None) -> dict[str, Any]:
    """A tiny SDXL pipeline in fp16 on one GPU, as examples/sdxl-lora-gpu.yaml trains SDXL; with
    `vae`, that folder as model.vae."""
    from finetune_trainer.testing.diffusion import text_to_image_job

    accelerator = {"type": "nvidia.com/gpu", "count": 1}
    change = {
        "resources": {"nodes": 1, "processesPerNode": 1, "accelerator": accelerator},
        "training": {
            "precision": "fp16",
            "batchSizePerDevice": 4,
            "centerCrop": False,
            "randomFlip": True,
        },
        "evaluation": {"imageSamples": {"count": 2, "inferenceSteps": 2}},
    }
    if vae is not None:
        change["model"] = {"vae": {"source": f"file://{vae}"}}
    name = SDXL if vae is None else SDXL_VAE
    doc = text_to_image_job(pipeline, data, name=name, max_steps=6, checkpoint_every=3)
    return trainer_helpers.deep_update(doc, {"spec": change})


def embedding_cached_job(assets: Path) -> dict[str, Any]:
    """The tiny BERT sentence-transformers model trained in full in bf16 on one GPU, its batch
    of 16 embedded 4 rows at a time (GradCache), with dropout (the replay's random state)."""
    from finetune_trainer.example_data import write_code_search_splits
    from finetune_trainer.testing.embedding import embedding_job, save_tiny_bert

    model = save_tiny_bert(assets / "tiny-bert")
    write_code_search_splits(assets / "pairs")
    doc = embedding_job(model, assets / "pairs", name=EMBEDDING)
    accelerator = {"type": "nvidia.com/gpu", "count": 1}
    change = {
        "peft": {"method": "none"},
        "training": {"precision": "bf16", "batchSizePerDevice": 16, "cachedMiniBatchSize": 4},
        "resources": {"nodes": 1, "processesPerNode": 1, "accelerator": accelerator},
    }
    return trainer_helpers.deep_update(doc, {"spec": change})


def _oom_job(assets: Path, gpus: int) -> dict[str, Any]:
    """The tiny text-to-image pipeline at 4096 x 4096 pixels, 16 images a batch: its VAE's
    first activations alone need tens of GiB each, more than any GPU holds."""
    from finetune_trainer.testing.diffusion import (
        save_shapes_dataset,
        save_tiny_pipeline,
        text_to_image_job,
    )

    pipeline = save_tiny_pipeline(assets / "t2i-pipe", vae_steps=0, unet_steps=0)
    doc = text_to_image_job(pipeline, save_shapes_dataset(assets / "t2i-data", train=16, test=16))
    accelerator = {"type": "nvidia.com/gpu", "count": gpus}
    resources = {"nodes": 1, "processesPerNode": gpus, "accelerator": accelerator}
    training = {"resolution": 4096, "batchSizePerDevice": 16, "maxSteps": 2}
    return trainer_helpers.deep_update(
        doc, {"spec": {"resources": resources, "training": training}}
    )


if __name__ == "__main__":
    sys.exit(main())
