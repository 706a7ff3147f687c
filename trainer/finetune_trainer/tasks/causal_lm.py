"""causal-lm: next-token prediction on text, on prompt/response pairs with loss on the response
only, or on chat data (messagesField) with loss on the assistant turns only; optionally packed
into full maxSeqLength blocks. Scored by perplexity and loss over every scored token of the
evaluation split, and, when a generation metric is asked for, by exact_match, rouge, bleu or chrf
on greedy answers to the evaluation prompts (the last assistant turn of a conversation)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import TaskType
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from finetune_api.result import Sample
from finetune_api.v1alpha1 import CAUSAL_LM, FineTuneJobSpec
from finetune_trainer import chat, data, modeling
from finetune_trainer.evaluation import evaluating, scores_from_main
from finetune_trainer.generation import GenerationSettings, generate_answers
from finetune_trainer.map_cache import map_fingerprint
from finetune_trainer.model_card import source_id, transformers_usage
from finetune_trainer.scoring import ScorerUnavailable, load_scorer, mean_loss, perplexity
from finetune_trainer.tasks.base import (
    Artifact,
    Batch,
    CardInfo,
    Task,
    TaskData,
    Timed,
    untimed,
)

__all__ = [
    "IGNORE_INDEX",
    "CausalLM",
    "Collator",
    "chat_prompt",
    "generation_rows",
    "token_nll",
    "tokenize",
    "tokenize_chat",
]

# Label of a position that is not scored (prompt tokens, padding), as transformers' loss skips.
IGNORE_INDEX = -100
Columns = dict[str, list[Any]]
# Scores computed from the logits of the evaluation split; any other is scored on generated text.
_LOGIT_METRICS = frozenset({"perplexity", "loss"})


def _tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]  # documents end explicitly once packed together
    return ids


def _prompt_head(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The tokens a response follows: the chat template's user turn and generation prompt, or
    the prompt and a newline for a tokenizer without a template."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        return _as_ids(
            tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        )
    return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])


def _tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """Prompt and response tokens, with loss only on the response."""
    head = _prompt_head(tokenizer, prompt)
    if tokenizer.chat_template:
        full = _as_ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=True,
            )
        )
        if full[: len(head)] != head:  # a template that rewrites the prompt: train on it all
            head = []
    else:
        full = head + tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full = [*full, tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(head) + full[len(head) :]
    return full, labels


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """A conversation's tokens through the chat template, with loss only on the assistant turns
    (their content and end-of-turn marker): a token is scored when it starts inside one of the
    character spans `chat.assistant_spans` found."""
    text, spans = chat.assistant_spans(tokenizer, messages)
    # The template writes the special tokens it wants (bos...), as apply_chat_template does.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    # A token that straddles a turn's start (BPE merges the generation prompt's "\n" with the
    # answer's indent into one token) is the answer's: the model has to produce it.
    labels = [
        token if any(start < span.stop and end > span.start for span in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], str]:
    """The tokens to generate the last assistant turn from, as training saw them: the whole
    conversation's tokens that end before that turn. A token straddling the turn's start is left
    to the model, which then generates the end of the generation prompt (often a newline) first;
    that text is returned, to be cut from the front of the answer."""
    head, _ = chat.prompt_and_answer(tokenizer, messages)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    covered = 0
    for token, (_start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if end > len(head):
            break
        ids.append(token)
        covered = end
    return ids, head[covered:]


def _as_ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def tokenize(
    ds: Dataset,
    spec: FineTuneJobSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    pack: bool,
    drop_last: bool = True,
) -> Dataset:
    """Token ids and labels per row; with `pack`, rows become maxSeqLength blocks, the short tail
    kept only when `drop_last` is false (evaluation scores every token)."""
    d, max_len = spec.dataset, spec.training.max_seq_length
    encode: Callable[[Columns], Columns]
    if d.messages_field is not None:
        messages_field = d.messages_field
        data.require_columns(ds, {"messagesField": messages_field})
        chat.check_rows(ds[messages_field], messages_field, str(ds.split or "evaluation"))

        def encode(batch: Columns) -> Columns:
            pairs = [tokenize_chat(tokenizer, m) for m in batch[messages_field]]
            return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}
    elif d.prompt_field is not None and d.response_field is not None:
        prompt_field, response_field = d.prompt_field, d.response_field
        data.require_columns(ds, {"promptField": prompt_field, "responseField": response_field})

        def encode(batch: Columns) -> Columns:
            pairs = [
                _tokenize_pair(tokenizer, str(p), str(r))
                for p, r in zip(batch[prompt_field], batch[response_field], strict=True)
            ]
            return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}
    else:
        data.require_columns(ds, {"textField": d.text_field})

        def encode(batch: Columns) -> Columns:
            ids = [_tokenize_text(tokenizer, str(t)) for t in batch[d.text_field]]
            return {"input_ids": ids, "labels": ids}

    shape = (d.model_dump(mode="json"), tokenizer)
    out = ds.map(
        encode,
        batched=True,
        remove_columns=ds.column_names,
        new_fingerprint=map_fingerprint(ds, "tokenize", *shape),
    )
    if pack:
        return out.map(
            _packer(max_len, drop_last=drop_last),
            batched=True,
            batch_size=1000,
            remove_columns=out.column_names,
            new_fingerprint=map_fingerprint(out, "pack", max_len, drop_last),
        )
    return out.map(
        lambda b: {k: [v[:max_len] for v in b[k]] for k in ("input_ids", "labels")},
        batched=True,
        new_fingerprint=map_fingerprint(out, "truncate", max_len),
    )


def generation_rows(
    ds: Dataset, spec: FineTuneJobSpec, tokenizer: PreTrainedTokenizerBase
) -> Dataset:
    """Per evaluation row: the prompt's tokens to generate from (`prompt_ids`), the text to cut
    from the front of the answer (`answer_prefix`, see `chat_prompt`), the text a person reads as
    the prompt (`prompt`) and the reference answer (`reference`). For chat data the
    prompt is the conversation before its last assistant turn and the reference is that turn."""
    d = spec.dataset
    if d.messages_field is not None:
        field = d.messages_field
        data.require_columns(ds, {"messagesField": field})
        chat.check_rows(ds[field], field, str(ds.split or "evaluation"))

        def encode(batch: Columns) -> Columns:
            out: Columns = {"prompt_ids": [], "answer_prefix": [], "prompt": [], "reference": []}
            for messages in batch[field]:
                ids, prefix = chat_prompt(tokenizer, messages)
                out["prompt_ids"].append(ids)
                out["answer_prefix"].append(prefix)
                # What the user last said, as a person would quote the conversation.
                last_user = next(m for m in reversed(messages) if m["role"] == "user")
                out["prompt"].append(last_user["content"])
                out["reference"].append(messages[-1]["content"])
            return out
    elif d.prompt_field is not None and d.response_field is not None:
        prompt_field, response_field = d.prompt_field, d.response_field
        data.require_columns(ds, {"promptField": prompt_field, "responseField": response_field})

        def encode(batch: Columns) -> Columns:
            prompts = [str(p) for p in batch[prompt_field]]
            return {
                "prompt_ids": [_prompt_head(tokenizer, p) for p in prompts],
                "answer_prefix": [""] * len(prompts),
                "prompt": prompts,
                "reference": [str(r) for r in batch[response_field]],
            }
    else:
        raise ScorerUnavailable(
            ", ".join(m for m in spec.evaluation.metrics if m not in _LOGIT_METRICS),
            "scores of generated text need prompts: set dataset.promptField and responseField, "
            "or dataset.messagesField",
        )
    return ds.map(
        encode,
        batched=True,
        remove_columns=ds.column_names,
        new_fingerprint=map_fingerprint(ds, "prompts", d.model_dump(mode="json"), tokenizer),
    )


def _packer(block: int, *, drop_last: bool) -> Callable[[Columns], Columns]:
    def pack(batch: Columns) -> Columns:
        ids = list(itertools.chain.from_iterable(batch["input_ids"]))
        labels = list(itertools.chain.from_iterable(batch["labels"]))
        end = len(ids) - len(ids) % block if drop_last else len(ids)
        starts = range(0, end, block)
        return {
            "input_ids": [ids[i : i + block] for i in starts],
            "labels": [labels[i : i + block] for i in starts],
        }

    return pack


@dataclass
class Collator:
    """Pads a micro-batch to its longest row, padded labels unscored; packed rows need none."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        batch = data.pad_inputs(rows, self.pad_token_id)
        labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        batch["labels"] = labels
        return batch


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL and the number of scored tokens."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


class CausalLM(Task):
    name = CAUSAL_LM
    peft_task_type: ClassVar[TaskType] = TaskType.CAUSAL_LM

    def build_data(self, train: Dataset, evaluation: Dataset) -> TaskData:
        tokenizer = modeling.load_tokenizer(self.spec.model)
        pack = self.spec.training.packing
        with data.dataset_errors():  # the tokenizer is the model's; from here on, the data's
            rows = tokenize(train, self.spec, tokenizer, pack=pack, drop_last=True)
            eval_rows = tokenize(evaluation, self.spec, tokenizer, pack=pack, drop_last=False)
        prompts = None
        if self.generates:  # only then: perplexity-only jobs keep today's cost
            try:
                with data.dataset_errors():
                    prompts = generation_rows(evaluation, self.spec, tokenizer)
            except data.DatasetError as exc:
                if isinstance(exc.__cause__, ScorerUnavailable):
                    raise exc.__cause__ from None
                raise
        self._data = TaskData(
            processor=tokenizer,
            train=rows,
            evaluation=eval_rows,
            collate=Collator(tokenizer.pad_token_id),
            prompts=prompts,
        )
        return self._data

    @property
    def generates(self) -> bool:
        """Whether evaluation generates answers: a score of generated text is asked for."""
        return any(name not in _LOGIT_METRICS for name in self.metrics)

    def _load_base(self) -> modeling.BaseLoader:
        return modeling.BaseLoader(AutoModelForCausalLM, self.spec.model)

    def load_model(self, data: TaskData, device: torch.device) -> torch.nn.Module:
        pad = data.processor.pad_token_id
        return modeling.load_model(self.spec, self._load_base(), pad, self.peft_task_type, device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # transformers shifts the labels and averages over the scored (non-IGNORE_INDEX) tokens.
        return model(**batch).loss

    def evaluate(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        batches: Iterable[Batch],
        timed: Timed = untimed,
    ) -> dict[str, float]:
        nll_sum, token_count = 0.0, 0
        answers: list[str] = []
        with evaluating(model):
            if any(name in _LOGIT_METRICS for name in self.metrics):
                for batch in batches:
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                    nll, tokens = accelerator.gather_for_metrics(token_nll(logits, batch["labels"]))
                    nll_sum += float(nll.double().sum())
                    token_count += int(tokens.sum())
            if self._data is not None and self._data.prompts is not None:
                answers = self._generate(accelerator, model, self._data, timed)
        references = list(self._data.prompts["reference"]) if answers and self._data else []
        self.generated = self._samples(answers)
        return scores_from_main(
            accelerator, lambda: self._scores(nll_sum, token_count, answers, references)
        )

    # The data build_data made: evaluation generates from its prompts.
    _data: TaskData | None = None

    def _generate(
        self, accelerator: Accelerator, model: torch.nn.Module, d: TaskData, timed: Timed
    ) -> list[str]:
        assert d.prompts is not None
        tokenizer, e = d.processor, self.spec.evaluation
        settings = GenerationSettings(
            max_new_tokens=e.max_new_tokens,
            batch_size=self.spec.training.batch_size_per_device,
            max_prompt_tokens=self.spec.training.max_seq_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        prompts = d.prompts["prompt_ids"]
        answers = generate_answers(accelerator, model, tokenizer, prompts, settings, timed)
        # The end of the generation prompt that the prompt's tokens left to the model.
        return [a.removeprefix(p) for a, p in zip(answers, d.prompts["answer_prefix"], strict=True)]

    def _samples(self, answers: list[str]) -> list[Sample]:
        if not answers or self._data is None or self._data.prompts is None:
            return []
        n = min(self.spec.evaluation.samples, len(answers))
        rows = self._data.prompts.select(range(n))
        return [
            Sample(prompt=r["prompt"], reference=r["reference"], after=a)
            for r, a in zip(rows, answers[:n], strict=True)
        ]

    def _scores(
        self, nll_sum: float, token_count: int, answers: list[str], references: list[str]
    ) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name in self.metrics:
            if name == "perplexity":
                scores[name] = perplexity(nll_sum, token_count)
            elif name == "loss":
                scores[name] = mean_loss(nll_sum, token_count)
            else:  # a score of generated text: built in (exact_match...) or a Hub metric
                result = load_scorer(name).compute(predictions=answers, references=references)
                value = result.get(name, next(iter(result.values()))) if result else math.nan
                scores[name] = float(value)
        return scores

    def save(self, model: torch.nn.Module, data: TaskData, out: Path) -> Artifact:
        return modeling.save_artifact(model, data.processor, self.spec, out, self._load_base())

    def card(self, artifact: Artifact, repo: str) -> CardInfo:
        return CardInfo(
            pipeline_tag="text-generation",
            task_name="Text Generation",
            library_name="peft" if artifact == "adapter" else "transformers",
            usage=transformers_usage(
                "AutoModelForCausalLM", source_id(self.spec.model.source), repo, artifact
            ),
            settings=(("Packing", self.spec.training.packing),),
        )
