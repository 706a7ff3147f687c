"""Build the e2e's tiny base model and dataset, offline, into OUT_DIR/{model,data}.

    python seed_tiny.py OUT_DIR

Runs as the init container of the in-cluster Hub test double (trainer image: torch,
transformers, tokenizers, finetune_trainer), which then serves OUT_DIR/model as model repo
org/tiny and OUT_DIR/data as dataset repo org/tiny-data. Same recipe as
tests/trainer/conftest.py (finetune_trainer.testing.tiny): a random Llama and a byte-level BPE
tokenizer trained here on the data itself, so the model can
visibly learn it in a few dozen steps. Sized so
that one step takes ~0.3 s on one CPU thread (a 6-layer Llama, hidden size 512, ~21 M
parameters, 83 MB): a 40-step job then trains for long enough (tens of seconds) that its
progress is visible in `kubectl get ftj`, where a hidden-size-32 model finishes in under 1 s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    from finetune_trainer.testing.tiny import save_tiny_model, sentences

    data_dir, model_dir = out / "data", out / "model"
    data_dir.mkdir(parents=True, exist_ok=True)
    train, test = sentences(600, 1), sentences(80, 2)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (data_dir / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (data_dir / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: train.jsonl\n  - split: test\n    path: test.jsonl\n---\n"
        "# tiny-data\n\nSynthetic repeated-word sentences for the finetune-operator e2e test.\n"
    )

    save_tiny_model(
        model_dir,
        sentences(500, 0),
        vocab_size=400,
        hidden_size=512,
        intermediate_size=1536,
        layers=6,
        heads=8,
        max_positions=256,
    )
    (model_dir / "README.md").write_text(
        "# tiny\n\nA random 6-layer Llama (hidden size 512) for tests.\n"
    )
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"seeded {path.relative_to(out)} ({path.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
