"""GPU smoke check, for a machine with CUDA (not collected by pytest: no test_ prefix).

    PYTHONPATH=operator:trainer python tests/trainer/gpu_smoke.py OUT_DIR

Builds the tiny model of the test fixtures, then runs `finetune run` on one GPU with
precision auto (which must pick bf16) and, where bitsandbytes is installed, peft qlora. Each
run's result JSON and log land in OUT_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_helpers

from finetune_trainer.testing.tiny import causal_job, save_test_llama, save_test_text


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    assets = out / "assets"
    assets.mkdir(exist_ok=True)
    base = causal_job(save_test_llama(assets / "tiny-llama"), save_test_text(assets / "text.jsonl"))
    gpu = {"nodes": 1, "processesPerNode": 1, "accelerator": {"type": "nvidia.com/gpu", "count": 1}}
    variants = {"lora-auto": {"peft": {"method": "lora"}}}
    try:
        import bitsandbytes  # noqa: F401

        variants["qlora"] = {"peft": {"method": "qlora"}}
    except ImportError:
        print("bitsandbytes not installed: qlora skipped")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(out / "hf-home"),
    }
    worst = 0
    for name, change in variants.items():
        doc = trainer_helpers.deep_update(base, {"spec": {"resources": gpu, **change}})
        manifest = out / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "finetune_cli",
                "run",
                str(manifest),
                "--workdir",
                str(out / name),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        (out / f"{name}.log").write_text(done.stderr)
        print(name, "exit", done.returncode)
        print(done.stdout[-2000:])
        print(
            "\n".join(
                line
                for line in done.stderr.splitlines()
                if "rank 0 of" in line or "Error" in line or "precision" in line
            )[-3000:]
        )
        worst = max(worst, done.returncode)
    return worst


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
