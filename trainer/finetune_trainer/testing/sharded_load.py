"""Load a causal-lm FineTuneJob's base as `finetune train` does under strategy fsdp, and shard
it, on a real gloo process group: what each rank then holds, to check it and to measure it.

    python -m finetune_trainer.testing.sharded_load JOB_YAML OUT_DIR [--every-rank-loads] [--state]
        [--keep-fp32 MODULE]
    python -m finetune_trainer.testing.sharded_load JOB_YAML OUT_DIR --generate

`gang(...)` starts the ranks as one pod's processes. Each rank writes OUT_DIR/rank-N.json:
whether it built the base empty (on the meta device), and its peak resident memory by the end
of sharding (VmHWM: loading is the peak). With `--state` it also writes OUT_DIR/rank-N.pt,
the whole value of every parameter and buffer after sharding. `--every-rank-loads` is the
baseline: every rank reads the weights, as before sharding.loading_device. `--keep-fp32 MODULE`
loads the tiny Llama as a model class that keeps MODULE in fp32 under bf16 would (transformers'
`_keep_in_fp32_modules_strict`).

`--generate` instead answers the same prompts by evaluation's generation (`generate_answers`)
twice on every rank, with the whole base and then with it sharded, and writes both answer
lists (`whole`, `sharded`) and how far the logits of a forward through the root after each
differ (`logitsDiff`). The prompts are such that one rank's batch ends at its first token
(`_generation_prompts`) while the other's goes on, and the ranks have unequal numbers of batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from peft import TaskType
from transformers import AutoModelForCausalLM

from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_api.validation import parse_manifest
from finetune_trainer import modeling, sharding
from finetune_trainer.evaluation import evaluating
from finetune_trainer.generation import GenerationSettings, generate_answers
from finetune_trainer.testing.gang import free_ports

CPU = torch.device("cpu")


def load(spec: FineTuneJobSpec, where: torch.device) -> torch.nn.Module:
    """The job's base model as `finetune train` loads a causal-lm job's onto `where` (without
    compiling it): after the job's seed, as there, so that a fresh LoRA is the same."""
    set_seed(spec.training.seed)
    loader = modeling.BaseLoader(AutoModelForCausalLM, spec.model)
    return modeling.load_model(spec, loader, 0, TaskType.CAUSAL_LM, where)


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole value (a collective, for a sharded model) and every buffer."""
    state = {name: sharding.full_tensor(p.detach()) for name, p in model.named_parameters()}
    return state | {name: b.detach().clone() for name, b in model.named_buffers()}


def _rank(
    job_yaml: Path, out: Path, every_rank_loads: bool, keep_state: bool, keep_fp32: str | None
) -> None:
    if keep_fp32:  # as a model class that keeps that module in fp32 under bf16 would
        from transformers import LlamaForCausalLM

        LlamaForCausalLM._keep_in_fp32_modules_strict = {keep_fp32}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = parse_manifest(yaml.safe_load(job_yaml.read_text())).spec
    model = load(spec, CPU if every_rank_loads else sharding.loading_device(spec, rank, CPU))
    empty = any(p.is_meta for p in model.parameters())
    model = sharding.shard(model, "no", CPU)
    peak = _high_water_mark()
    if keep_state:
        torch.save(whole_state(model), out / f"rank-{rank}.pt")
    (out / f"rank-{rank}.json").write_text(json.dumps({"builtEmpty": empty, "peakRss": peak}))
    dist.destroy_process_group()


def _generation_prompts(model: torch.nn.Module, vocab: int) -> tuple[list[list[int]], int]:
    """Five prompts of random tokens and an end-of-sequence token: the last two are one prompt,
    whose first greedy token is that token, and the first three begin otherwise. Split over two
    ranks in batches of 2, rank 0 answers [0, 1] and [2] and rank 1 answers [3, 4], which ends
    at its first new token."""
    rng = torch.Generator().manual_seed(0)

    def first_token(ids: list[int]) -> int:
        with torch.no_grad():
            return int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())

    candidates = [torch.randint(vocab, (3 + i % 4,), generator=rng).tolist() for i in range(40)]
    ending = candidates.pop()
    eos = first_token(ending)
    going_on = [c for c in candidates if first_token(c) != eos][:3]
    if len(going_on) < 3:
        raise RuntimeError(f"most prompts begin with token {eos}: no three that go on")
    return [*going_on, ending, ending], eos


def _generate(job_yaml: Path, out: Path) -> None:
    # A short timeout: ranks whose forwards do not pair up fail the test in a minute, not 30.
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))]
    )
    spec = parse_manifest(yaml.safe_load(job_yaml.read_text())).spec
    tokenizer = modeling.load_tokenizer(spec.model)
    model = load(spec, CPU)
    prompts, eos = _generation_prompts(model, len(tokenizer))
    settings = GenerationSettings(
        max_new_tokens=8,
        batch_size=2,
        max_prompt_tokens=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    answers, logits = {}, {}
    for how in ("whole", "sharded"):
        if how == "sharded":
            model = sharding.shard(model, "no", CPU)
        with evaluating(model):
            answers[how] = generate_answers(accelerator, model, tokenizer, prompts, settings)
            # Then a forward through the root, as training's next step makes.
            logits[how] = model(input_ids=torch.tensor(prompts[:1])).logits
    report = {
        "eos": tokenizer.decode([eos]),
        **answers,
        "logitsDiff": float((logits["whole"] - logits["sharded"]).abs().max()),
    }
    (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _high_water_mark() -> int:
    """This process's peak resident memory in bytes: the kernel's VmHWM, which starts afresh at
    exec. Not ru_maxrss, which a child inherits from the parent it forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def gang(
    job_yaml: Path,
    out: Path,
    ranks: int = 2,
    every_rank_loads: bool = False,
    keep_state: bool = False,
    keep_fp32: str | None = None,
    generate: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> list[dict[str, object]]:
    """Run the ranks as one pod's processes; each one's report (rank-N.json). Raises, with the
    rank's output, when one fails."""
    out.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", __name__, str(job_yaml), str(out)]
    cmd += ["--every-rank-loads"] * every_rank_loads + ["--state"] * keep_state
    cmd += ["--generate"] * generate + (["--keep-fp32", keep_fp32] if keep_fp32 else [])
    procs = []
    for rank in range(ranks):
        rank_env = {
            **(env if env is not None else os.environ),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        log = (out / f"rank-{rank}.log").open("w")
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
    for rank, proc in enumerate(procs):
        if proc.wait(timeout=timeout) != 0:
            text = (out / f"rank-{rank}.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"rank {rank} exited {proc.returncode}:\n{text}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--every-rank-loads", action="store_true")
    parser.add_argument("--state", action="store_true")
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--keep-fp32", metavar="MODULE")
    args = parser.parse_args(argv)
    if args.generate:
        _generate(args.job, args.out)
    else:
        _rank(args.job, args.out, args.every_rank_loads, args.state, args.keep_fp32)


if __name__ == "__main__":
    main()
