"""Tiny random causal LMs for tests and benchmarks: a Llama and a BPE tokenizer trained on the spot.

No download: the byte-level BPE tokenizer is trained on the caller's texts, with special tokens
`<s>` (bos, id 0), `</s>` (eos, id 1) and `<pad>` (pad, id 2), and the Llama's weights are random
(seeded, so a given size and seed always gives the same model). The tokenizer has a real chat
template (`CHAT_TEMPLATE`), so the chat-data path runs in the tests as with a published model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "WORDS",
    "causal_job",
    "save_test_llama",
    "save_test_text",
    "save_tiny_model",
    "sentences",
    "tiny_llama",
    "train_tokenizer",
]

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
# Zephyr-like turns, each closed by eos (`<|user|>\nHi</s><|assistant|>\nHello</s>`), so that greedy
# generation stops at the end of the answer. The assistant's content and eos sit in a
# `{% generation %}` block as in TRL's templates, so transformers' return_assistant_tokens_mask
# works too (the trainer finds the turns without it; tests compare the two).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)
WORDS = (
    "red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "tree", "river", "stone",
    "cloud", "fire", "water", "north", "south", "east", "west", "apple", "bread", "milk", "honey",
)  # fmt: skip


def sentences(n: int, seed: int) -> list[str]:
    """Short, learnable text: each row repeats a small pattern of three of `WORDS`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pattern = rng.sample(WORDS, 3)
        rows.append(" ".join(pattern * rng.randint(2, 6)))
    return rows


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with bos `<s>`, eos `</s>`, pad `<pad>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    max_positions: int,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (untied embeddings, no GQA) sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(out: Path, texts: Iterable[str], *, vocab_size: int, **llama: int) -> Path:
    """Train a tokenizer on `texts`, build `tiny_llama(tokenizer, **llama)`, save both to `out`."""
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(out)
    tiny_llama(tokenizer, **llama).save_pretrained(out)
    return out


def save_test_llama(out: Path) -> Path:
    """The test suites' model: a 2-layer Llama with hidden size 32, and its tokenizer."""
    return save_tiny_model(
        out,
        sentences(500, 0),
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        layers=2,
        heads=2,
        max_positions=256,
    )


def save_test_text(out: Path, rows: int = 600) -> Path:
    """The test suites' causal-LM data: 600 sentences as {"text": ...} JSON lines."""
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(rows, 1)))
    return out


def causal_job(
    model_dir: Path,
    data_file: Path,
    *,
    name: str = "tiny",
    namespace: str = "tests",
    max_steps: int = 20,
    checkpoint_every: int = 10,
) -> dict[str, Any]:
    """A valid 2-node LoRA FineTuneJob for `save_test_llama` and `save_test_text`."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": f"file://{model_dir}", "task": "causal-lm"},
            "dataset": {"source": f"file://{data_file}", "evalFraction": 0.1},
            "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 3.0e-3,
                "batchSizePerDevice": 4,
                "maxSeqLength": 32,
                "checkpointEverySteps": checkpoint_every,
                "seed": 7,
            },
            "evaluation": {"metrics": ["perplexity"], "maxSamples": 40},
            "resources": {"nodes": 2, "processesPerNode": 1},
        },
    }
