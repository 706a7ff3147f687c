"""The trainers a throughput benchmark compares, run side by side on the same model and data.

- `finetune`: this trainer, through `finetune train` with the env a pod gets (packed batches;
  on CPU it preloads tcmalloc where installed, as a CPU pod does).
- `trainer`: a plain `transformers.Trainer` + peft script, padding each micro-batch to its
  longest row: what a user writes without TRL.
- `trl`: TRL's `SFTTrainer` with `packing=True` and its default strategy (best-fit decreasing,
  padding-free: the documents of a row keep their own positions and attend only to themselves),
  and TRL's other defaults, gradient checkpointing on among them: what a TRL user gets.

Every contender trains the same randomly initialised Llama (built here from a `Shape`, no
download) with the same LoRA (r, alpha 2r, no dropout, every linear layer), learning rate,
documents, global batch and number of optimizer steps. Each rank is its own process with the
env a pod gets (RANK, WORLD_SIZE, MASTER_*), and the CPU threads are split evenly between ranks.

Throughput is real (non-pad) tokens of the training micro-batches, summed over ranks, per
second of the training loop (first step to last, model loading and evaluation left out):
this trainer reports it itself (the attention mask of every micro-batch); the two scripts count
the attention mask, or every token of a padding-free row, in `training_step`. All three time
the loop from the end of its first optimizer step to the end of its last. Peak memory is
measured from outside, the same way for all (PeakMemory): device memory in use (nvidia-smi) on
a GPU, the kernel's peak resident set of each rank's process tree on CPU.

`python benchmarks/contenders.py --reference-rank SETTINGS_JSON` is one rank of a script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune_trainer.testing.gang import LocalGang, free_ports, offline_env

Contender = Literal["finetune", "trainer", "trl"]
Device = Literal["cpu", "cuda"]
# The reference scripts' optimizer learning rate; this trainer gets the same in its spec.
LEARNING_RATE = 2e-4
# How often a GPU's memory in use is sampled (seconds).
_MEMORY_POLL_S = 0.2
# How peak memory is measured (PeakMemory), for the results' JSON.
PEAK_MEMORY = (
    "on a GPU the device memory in use (nvidia-smi, sampled every 0.2 s) beyond what was in use "
    "before the contender started; on CPU the kernel's own peak resident set (ru_maxrss from "
    "wait4) of the largest process in each rank's or pod's process tree, summed over them"
)
# One run of one contender on a loaded 2-core machine, or an 8B model on a GPU, takes minutes.
_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Shape:
    """A Llama's architecture: enough to build its config by hand."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    rope_theta: float
    rms_norm_eps: float = 1e-5


SHAPES = {
    # HuggingFaceTB/SmolLM2-135M's config.json.
    "smollm2-135m": Shape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, 100000.0),
    # meta-llama/Llama-3.1-8B's config.json (its rope scaling only matters past 8k positions).
    "llama-3.1-8b": Shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False, 500000.0),
    # The shape the old CPU benchmark used; kept for a quick look at per-step overhead.
    "tiny-128": Shape("Llama 4x128", 128, 4, 4, 4, 344, 1000, False, 10000.0),
    # The test suite's: the scripts' code paths in seconds.
    "test": Shape("Llama 2x32", 32, 2, 2, 1, 64, 400, True, 10000.0),
}


@dataclass(frozen=True)
class Setting:
    """What every contender of one comparison shares."""

    seq_len: int
    global_batch: int
    steps: int
    lora_r: int
    device: Device
    precision: Literal["fp32", "bf16"]


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    shape: str,
    seq_len: int,
    global_batch: int,
    steps: int,
    repeats: int,
) -> None:
    """The options every benchmark script shares, with its own defaults."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default=shape)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--global-batch", type=int, default=global_batch, help="rows per step")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats, help="runs per figure; the median")
    parser.add_argument("--lora-r", type=int, default=16)


def setting_of(args: argparse.Namespace, device: Device, precision: str) -> Setting:
    """The Setting of the options `add_arguments` added."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: fp32 or bf16")
    return Setting(
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        steps=args.steps,
        lora_r=args.lora_r,
        device=device,
        precision=precision,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Assets:
    """The saved model and the documents (JSON lines, a `text` field) every contender reads."""

    model: Path
    data: Path
    shape: Shape


@dataclass(frozen=True)
class Sample:
    """One run of one contender."""

    tokens_per_second: float
    peak_memory_bytes: int
    load_average: float
    # The share of the timed micro-batches' tokens that were padding (computed, not counted).
    padding: float = 0.0


def _llama_config(shape: Shape, max_positions: int, special: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=shape.tied,
        **special,
    )


def build_assets(
    root: Path, shape: Shape, setting: Setting, docs: int, words: tuple[int, int]
) -> Assets:
    """A randomly initialised `shape` (seeded), a BPE tokenizer, and `docs` documents of a
    uniformly drawn number of words in `words`, each word about one token."""
    import torch
    from transformers import LlamaForCausalLM

    from finetune_trainer.testing.tiny import WORDS, train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(docs)]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # The tokenizer's vocabulary is small (the texts have few words); the model's is the
    # shape's, so the embedding and the head cost what they cost in the real model.
    tokenizer = train_tokenizer(texts[:500], min(shape.vocab, 400))
    model_dir = root / "model"
    tokenizer.save_pretrained(model_dir)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _llama_config(shape, max(setting.seq_len, 2048), special)
    dtype = torch.bfloat16 if setting.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    # Random init of an 8B model on the CPU takes minutes; on the GPU, seconds.
    with torch.device(setting.device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(model_dir)
    del model
    if setting.device == "cuda":
        torch.cuda.empty_cache()  # the contenders need the whole device
    return Assets(model_dir, data, shape)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """A benchmark's JSON, written whole (its folder made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def parameter_counts(shape: Shape, lora_r: int) -> dict[str, int]:
    """The model's parameters, counted on the meta device (no memory): `total` (base + LoRA),
    `embedding` (the input lookup table), `matmul` (every parameter a token multiplies: all but
    the lookup, plus the head again when it shares the lookup's matrix) and `trainable` (LoRA)."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        base = LlamaForCausalLM(_llama_config(shape, 2048, {}))
        model = get_peft_model(base, lora_config(lora_r))
    total = sum(p.numel() for p in model.parameters())
    embedding = shape.vocab * shape.hidden
    head = shape.vocab * shape.hidden
    matmul = total - embedding + (head if shape.tied else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "embedding": embedding, "matmul": matmul, "trainable": trainable}


def lora_config(r: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def base_env(root: Path) -> dict[str, str]:
    """Every rank's env before its rendezvous: offline, with a Hub cache of its own."""
    return offline_env(root / "hf-home")


def _threads(world: int) -> str:
    """The machine's cores split evenly between the ranks."""
    return str(max(1, (os.cpu_count() or 1) // world))


def rank_envs(world: int, base: dict[str, str]) -> list[dict[str, str]]:
    """The env of each rank of a reference script: what torch.distributed's env:// reads."""
    port = str(free_ports(1)[0])
    return [
        {
            **base,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": _threads(world),
        }
        for r in range(world)
    ]


class PeakMemory:
    """The highest memory a contender used. On a GPU, what nvidia-smi reports in use on device 0
    beyond what was in use at the start (this process's own CUDA context), polled in a thread.
    On CPU nothing samples the contender while it runs: reading a process's PSS walks its page
    tables under its memory-map lock, which on 2 cores cost the ranks a quarter of a core and
    stalled their page faults. The kernel keeps each process tree's peak resident set instead,
    and `wait` reads it as it reaps the processes (wait4's ru_maxrss: the largest of the process
    and its reaped descendants; a forked rank's pages shared with its launcher count once)."""

    def __init__(self, device: Device) -> None:
        self.device, self.peak = device, 0
        self._baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            self._baseline = self._gpu_used()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def wait(self, procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> list[int]:
        """Wait for every process, at most `timeout` seconds in all (then TimeoutExpired); their
        exit codes. On CPU, `peak` becomes the sum of their trees' peak resident sets."""
        deadline = time.monotonic() + timeout
        peak = 0
        for p in procs:
            while True:  # wait4 has no timeout: poll it, without touching the process
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(p.args, timeout)
                time.sleep(_MEMORY_POLL_S)
            p.returncode = os.waitstatus_to_exitcode(status)
            peak += usage.ru_maxrss * 1024  # KiB on Linux
        if self.device == "cpu":
            self.peak = peak
        return [int(p.returncode) for p in procs]

    def _poll(self) -> None:
        while not self._stop.wait(_MEMORY_POLL_S):
            try:
                self.peak = max(self.peak, self._gpu_used() - self._baseline)
            except (OSError, ValueError, subprocess.SubprocessError):
                continue  # nvidia-smi busy: the next poll counts

    @staticmethod
    def _gpu_used() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return int(out.split()[0]) * 1024 * 1024  # MiB


def _run_ranks(
    commands: list[tuple[list[str], dict[str, str]]], device: Device, what: str, logs: Path
) -> int:
    """Start every rank and wait for all; the peak memory they used. Fails, naming the log
    folder, when a rank fails."""
    with PeakMemory(device) as memory:
        procs = []
        for i, (argv, env) in enumerate(commands):
            with (logs / f"rank-{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            codes = memory.wait(procs, _TIMEOUT_S)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
    if any(codes):
        tail = (logs / "rank-0.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} failed (exit codes {codes}):\n{tail}")
    return memory.peak


def run_finetune(
    root: Path, assets: Assets, setting: Setting, world: int, base: dict[str, str]
) -> Sample:
    """This trainer through `finetune train`, packed, one pod per rank (a LocalGang)."""
    accelerator = (
        {"type": "nvidia.com/gpu", "count": 1} if setting.device == "cuda" else {"type": "cpu"}
    )
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": f"file://{assets.model}"},
            "dataset": {"source": f"file://{assets.data}", "evalFraction": 0.01},
            "peft": {"r": setting.lora_r, "alpha": 2 * setting.lora_r, "dropout": 0.0},
            "training": {
                "maxSteps": setting.steps,
                "learningRate": LEARNING_RATE,
                "batchSizePerDevice": setting.global_batch // world,
                "maxSeqLength": setting.seq_len,
                "packing": True,
                "checkpointEverySteps": 100000,
                "precision": setting.precision,
            },
            # The smallest evaluation: it runs outside the timed loop, but costs wall time.
            "evaluation": {"maxSamples": 1},
            "resources": {"nodes": world, "accelerator": accelerator},
            # A first step of minutes on a loaded 2-core machine is slow, not hung.
            "runPolicy": {"hangTimeoutSeconds": _TIMEOUT_S},
        },
    }
    work = Path(tempfile.mkdtemp(prefix="finetune-", dir=root))
    manifest = work / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    gang = LocalGang(manifest, work, {**base, "OMP_NUM_THREADS": _threads(world)}, world)
    load = os.getloadavg()[0]
    with PeakMemory(setting.device) as memory:
        gang.start()
        try:
            codes = memory.wait(gang.procs, _TIMEOUT_S)
        except subprocess.TimeoutExpired:
            gang.kill()
            raise
    if any(codes):
        raise RuntimeError(
            f"finetune train failed at {world} rank(s) ({codes}):\n{gang.log_text()[-3000:]}"
        )
    # How it trained (dtypes, strategy, checkpointing, compiled layers), for the run's log.
    for line in gang.log_text().splitlines():
        if "[rank 0]" in line and ("weights load" in line or "torch.compile" in line):
            print(line, file=sys.stderr, flush=True)
    return Sample(float(gang.result()["tokensPerSecond"]), memory.peak, load)


def run_reference(
    root: Path,
    assets: Assets,
    setting: Setting,
    contender: Contender,
    world: int,
    base: dict[str, str],
) -> Sample:
    """`contender` ("trainer" or "trl") as a script of its own, one process per rank."""
    work = Path(tempfile.mkdtemp(prefix=f"{contender}-", dir=root))
    settings = {
        "contender": contender,
        "model": str(assets.model),
        "data": str(assets.data),
        "setting": asdict(setting),
        "out": str(work / "result.json"),
        "work": str(work),
    }
    argv = [sys.executable, __file__, "--reference-rank", json.dumps(settings)]
    commands = [(argv, env) for env in rank_envs(world, base)]
    load = os.getloadavg()[0]
    peak = _run_ranks(commands, setting.device, f"{contender} at {world} rank(s)", work)
    result = json.loads((work / "result.json").read_text())
    return Sample(float(result["tokens_per_second"]), peak, load, float(result["padding"]))


def run(
    contender: Contender,
    root: Path,
    assets: Assets,
    setting: Setting,
    world: int,
    base: dict[str, str],
) -> Sample:
    if contender == "finetune":
        return run_finetune(root, assets, setting, world, base)
    return run_reference(root, assets, setting, contender, world, base)


def reference_rank(settings: dict[str, Any]) -> None:
    """One rank of the plain Trainer + peft script or of the TRL SFTTrainer script."""
    import torch
    import torch.distributed as dist
    from datasets import load_dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    setting = Setting(**settings["setting"])
    contender: Contender = settings["contender"]
    world = int(os.environ["WORLD_SIZE"])
    model_dir, cuda = settings["model"], setting.device == "cuda"
    dtype = torch.bfloat16 if setting.precision == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=settings["data"])["train"]
    counted = {"tokens": 0, "computed": 0}
    clock: dict[str, float] = {}

    def count(inputs: dict[str, Any]) -> None:
        mask = inputs.get("attention_mask")
        # A padding-free row (TRL's packing) has no mask and no padding: every token is real.
        counted["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        counted["computed"] += inputs["input_ids"].numel()

    class Clock(TrainerCallback):
        # From the end of the first optimizer step, as this trainer times itself: the first
        # step's warm-up (CUDA context, allocator growth, kernel selection) is not throughput.
        def on_step_end(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                if cuda:
                    torch.cuda.synchronize()
                clock["start"] = time.perf_counter()
                counted["tokens"] = counted["computed"] = 0

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            clock["end"] = time.perf_counter()

    common: dict[str, Any] = {
        "output_dir": settings["work"],
        "max_steps": setting.steps,
        "learning_rate": LEARNING_RATE,
        "per_device_train_batch_size": setting.global_batch // world,
        "use_cpu": not cuda,
        "bf16": setting.precision == "bf16",
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10_000,
        "dataloader_drop_last": True,
        "seed": 42,
    }
    if world > 1 and not cuda:
        # gloo needs a process group, which Trainer only creates when there are peers.
        common["ddp_backend"] = "gloo"

    trainer: Trainer
    if contender == "trainer":
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
            lora_config(setting.lora_r),
        )
        rows = ds.map(
            lambda b: tokenizer(
                [t + tokenizer.eos_token for t in b["text"]],
                truncation=True,
                max_length=setting.seq_len,
            ),
            batched=True,
            remove_columns=["text"],
        )

        class CountingTrainer(Trainer):
            def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
                count(inputs)
                return super().training_step(model, inputs, *args, **kwargs)

        trainer = CountingTrainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=rows,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[Clock()],
        )
    else:
        from trl import SFTConfig, SFTTrainer

        class CountingSFTTrainer(SFTTrainer):
            def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
                count(inputs)
                return super().training_step(model, inputs, *args, **kwargs)

        trainer = CountingSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
            # gradient_checkpointing stays at TRL's default (on); the other two do not checkpoint.
            args=SFTConfig(
                **common, max_length=setting.seq_len, packing=True, dataset_text_field="text"
            ),
            train_dataset=ds,
            processing_class=tokenizer,
            peft_config=lora_config(setting.lora_r),
            callbacks=[Clock()],
        )
    trainer.train()
    tokens = torch.tensor(
        [counted["tokens"], counted["computed"]], dtype=torch.long, device=trainer.args.device
    )
    if dist.is_initialized():
        dist.all_reduce(tokens)
    if int(os.environ["RANK"]) == 0:
        seconds = clock["end"] - clock["start"]
        real, computed = (int(n) for n in tokens)
        report = {"tokens_per_second": real / seconds, "padding": 1 - real / computed}
        Path(settings["out"]).write_text(json.dumps(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-rank", required=True, help="the rank's settings, as JSON")
    reference_rank(json.loads(parser.parse_args().reference_rank))
