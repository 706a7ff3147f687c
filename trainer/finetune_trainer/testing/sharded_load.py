"""Load a causal-lm FineTuneJob's base as `finetune train` does under strategy fsdp, and shard
it, on a real gloo process group: what each rank then holds, to check it and to measure it.

    python -m finetune_trainer.testing.sharded_load JOB_YAML OUT_DIR [--every-rank-loads] [--state]

`gang(...)` starts the ranks as one pod's processes. Each rank writes OUT_DIR/rank-N.json:
whether it built the base empty (on the meta device), and its peak resident memory by the end
of sharding (VmHWM: loading is the peak). With `--state` it also writes OUT_DIR/rank-N.pt,
the whole value of every parameter and buffer after sharding. `--every-rank-loads` is the
baseline: every rank reads the weights, as before sharding.loading_device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from accelerate.utils import set_seed
from peft import TaskType
from transformers import AutoModelForCausalLM

from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_api.validation import parse_manifest
from finetune_trainer import modeling, sharding
from finetune_trainer.testing.gang import free_ports

CPU = torch.device("cpu")


def load(spec: FineTuneJobSpec, where: torch.device) -> torch.nn.Module:
    """The job's base model as `finetune train` loads a causal-lm job's onto `where` (without
    compiling it): after the job's seed, as there, so that a fresh LoRA is the same."""
    set_seed(spec.training.seed)
    loader = modeling.base_loader(AutoModelForCausalLM, spec.model)
    return modeling.load_model(spec, loader, 0, TaskType.CAUSAL_LM, where)


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole value (a collective, for a sharded model) and every buffer."""
    state = {name: sharding.full_tensor(p.detach()) for name, p in model.named_parameters()}
    return state | {name: b.detach().clone() for name, b in model.named_buffers()}


def _rank(job_yaml: Path, out: Path, every_rank_loads: bool, keep_state: bool) -> None:
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
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> list[dict[str, object]]:
    """Run the ranks as one pod's processes; each one's report (rank-N.json). Raises, with the
    rank's output, when one fails."""
    out.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", __name__, str(job_yaml), str(out)]
    cmd += ["--every-rank-loads"] * every_rank_loads + ["--state"] * keep_state
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
    args = parser.parse_args(argv)
    _rank(args.job, args.out, args.every_rank_loads, args.state)


if __name__ == "__main__":
    main()
