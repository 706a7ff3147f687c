"""Evaluation by generation: greedy answers to the evaluation prompts, sharded across ranks.

Each rank takes a contiguous share of the prompts (`split_between_processes`, so no prompt is
answered twice), generates in left-padded micro-batches (a causal LM continues from the last
position of every row, so the padding must be on the left), and the answers are gathered back
into prompt order on every rank. Scoring them is the caller's, once, on the main process.

A sharded model (training.strategy fsdp) gathers each layer's weights from every rank at each
forward, so its ranks must run every forward together: each makes as many `generate` calls (a
rank with fewer prompts answers filler batches and drops the answers), and none stops before
the others (transformers' `synced_gpus`). Without that, a rank that finished would leave the
others waiting in a gather until the hang watchdog fired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from finetune_trainer import sharding

__all__ = ["GenerationSettings", "generate_answers", "left_pad"]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    batch_size: int
    # The longest prompt kept, in tokens; a longer one keeps its end (the generation prompt).
    max_prompt_tokens: int
    pad_token_id: int
    eos_token_id: int | None


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts padded on the left to the longest, with the matching attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate_answers(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
) -> list[str]:
    """Greedy answers to every prompt, in order, the same list on every rank.

    `model` is the prepared model; its unwrapped module generates (no gradient sync is involved).
    Call under `evaluation.evaluating(model)`.
    """
    generator = accelerator.unwrap_model(model)
    size = settings.batch_size
    with accelerator.split_between_processes(list(range(len(prompts)))) as share:
        batches = [share[start : start + size] for start in range(0, len(share), size)]
    synced = sharding.is_sharded(generator) and accelerator.num_processes > 1
    if synced and prompts:
        # The largest share is ceil(n / ranks) prompts; a filler batch repeats the first one.
        calls = math.ceil(math.ceil(len(prompts) / accelerator.num_processes) / size)
        batches += [[]] * (calls - len(batches))
    mine: list[tuple[int, str]] = []
    token = torch.tensor([[settings.pad_token_id]], device=accelerator.device)
    with sharding.whole_root(generator, token):
        for indices in batches:
            batch = left_pad(
                [list(prompts[i])[-settings.max_prompt_tokens :] for i in indices or [0]],
                settings.pad_token_id,
            )
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            out = generator.generate(
                **batch,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=settings.pad_token_id,
                eos_token_id=settings.eos_token_id,
                synced_gpus=synced,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
            if indices:  # not a filler
                mine.extend(zip(indices, texts, strict=True))
    answers = dict(gather_object(mine) if accelerator.num_processes > 1 else mine)
    return [answers[i] for i in range(len(prompts))]
