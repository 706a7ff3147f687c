"""Build the e2e's tiny base model and dataset, offline, into OUT_DIR/{model,data}.

    python seed_tiny.py OUT_DIR

Runs as the init container of the in-cluster Hub test double (trainer image: torch,
transformers, tokenizers), which then serves OUT_DIR/model as model repo org/tiny and
OUT_DIR/data as dataset repo org/tiny-data. Same recipe as tests/trainer/conftest.py: a
random Llama and a byte-level BPE tokenizer trained here on the data itself, so the model can
visibly learn it in a few dozen steps. Sized so
that one step takes ~0.3 s on one CPU thread (a 6-layer Llama, hidden size 512, ~21 M
parameters, 83 MB): a 40-step job then trains for long enough (tens of seconds) that its
progress is visible in `kubectl get ftj`, where a hidden-size-32 model finishes in under 1 s.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = [
    "red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "tree", "river", "stone",
    "cloud", "fire", "water", "north", "south", "east", "west", "apple", "bread", "milk", "honey",
]  # fmt: skip


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pattern = rng.sample(WORDS, 3)
        rows.append(" ".join(pattern * rng.randint(2, 6)))
    return rows


def main(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        sentences(500, 0),
        trainer=trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    (model_dir / "README.md").write_text(
        "# tiny\n\nA random 6-layer Llama (hidden size 512) for tests.\n"
    )
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"seeded {path.relative_to(out)} ({path.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
