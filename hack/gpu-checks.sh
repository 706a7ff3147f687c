#!/usr/bin/env bash
# The GPU checks of one machine in one run, each under its own time limit, so that what ran
# comes back even when a later check runs out of time:
#   hack/gpu-site.sh                 # here, with PyPI: the trainer's packages into .gpu-site/
#   hack/gpu-checks.sh OUT_DIR       # there, in the repository root, with a torch that sees CUDA
# 1. tests/trainer/gpu_smoke.py: bf16 LoRA (auto and asked for), qlora, FSDP LoRA and full, on
#    the visible GPUs (NCCL between 2 ranks where 2 GPUs are visible), SDXL text-to-image in
#    fp16, sentence-embedding in bf16 with gradient caching, and last a batch too large for the
#    GPU ending as DeviceOutOfMemory;
# 2. NCCL with 2 ranks: an all_reduce, each rank on its own GPU where there are 2 (on one GPU
#    both ranks share it, which NCCL refuses: the log says so);
# 3. benchmarks/gpu_throughput.py: the Llama-3.1-8B-shaped LoRA run against Trainer and TRL.
# OUT_DIR gets gpu_smoke.json, gpu_throughput.json, their logs and machine.txt (at most 8 files).
set -uo pipefail
out=${1:?usage: hack/gpu-checks.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out"
py=${PYTHON:-python3}
site=/tmp/gpu-site
rm -rf "$site"
for wheel in "$root"/.gpu-site/*.whl; do
  "$py" -m zipfile -e "$wheel" "$site" || exit 1
done
# The carried packages come first, so they win over the image's own versions.
export PYTHONPATH="$site:$root/api:$root/operator:$root/trainer:$root/cli:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_XET=1 PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc
  "$py" - <<'EOF'
import importlib.metadata as m, platform, torch
print("python", platform.python_version(), "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for name in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes",
             "diffusers", "sentence-transformers",
             "huggingface-hub", "tokenizers", "pyarrow", "numpy"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
print("nccl", torch.cuda.nccl.version())
EOF
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

echo "== gpu_smoke"
timeout "${SMOKE_S:-240}" "$py" tests/trainer/gpu_smoke.py /tmp/gpu-smoke \
  --summary "$out/gpu_smoke.json" --require-gpu --timeout "${VARIANT_S:-120}"
echo "gpu_smoke: exit $?"
tar czf "$out/gpu_smoke_logs.tar.gz" -C /tmp/gpu-smoke --exclude hf-home --exclude assets . \
  2>/dev/null

echo "== NCCL, 2 ranks"
cat >/tmp/nccl_two_ranks.py <<'EOF'
import os, torch, torch.distributed as dist
device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
dist.init_process_group("nccl", device_id=device)
x = torch.ones(1 << 20, device=device) * (dist.get_rank() + 1)
dist.all_reduce(x)
print(f"rank {dist.get_rank()}: all_reduce -> {x[0].item()} (want 3.0)", flush=True)
dist.destroy_process_group()
EOF
timeout "${NCCL_S:-60}" "$py" -m torch.distributed.run --nproc-per-node 2 /tmp/nccl_two_ranks.py \
  >"$out/nccl_two_ranks.log" 2>&1
echo "nccl two ranks: exit $?"
grep -E "all_reduce|Duplicate|ncclInvalidUsage|Error" "$out/nccl_two_ranks.log" | head -5

echo "== gpu_throughput"
timeout "${BENCH_S:-280}" "$py" benchmarks/gpu_throughput.py --out "$out/gpu_throughput.json" \
  >"$out/gpu_throughput.log" 2>&1
echo "gpu_throughput: exit $?"
tail -c 3000 "$out/gpu_throughput.log"
