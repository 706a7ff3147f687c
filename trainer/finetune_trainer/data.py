"""Datasets: loading, the train/eval split, tokenisation, packing and batching."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from finetune_api import FieldError, ManifestError
from finetune_api.v1alpha1 import CAUSAL_LM, DatasetSpec, FineTuneJobSpec
from finetune_trainer.modeling import source_location

IGNORE_INDEX = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_FALLBACK_EVAL_FRACTION = 0.1


def file_builder(path: Path) -> str | None:
    """The `datasets` builder for a data file, looking through a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("dataset_dict.json", "state.json"))


def load_raw(spec: DatasetSpec) -> DatasetDict:
    location = source_location(spec.source)
    if spec.source.startswith("hf://"):
        return load_dataset(location, spec.config)
    path = Path(location)
    if path.is_dir():
        loaded = load_from_disk(str(path)) if _is_saved_dataset(path) else load_dataset(str(path))
    else:
        builder = file_builder(path)
        if builder is None:
            raise ManifestError(
                [FieldError("spec.dataset.source", f"cannot tell the format of {path.name}")]
            )
        loaded = load_dataset(builder, data_files={"train": str(path)})
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def split(raw: DatasetDict, spec: DatasetSpec, seed: int) -> tuple[Dataset, Dataset]:
    """Train and eval splits per the contract: evalSplit, evalFraction, the dataset's own
    test/validation split, or a seeded 10% of train, in that order."""
    if spec.train_split not in raw:
        raise ManifestError(
            [
                FieldError(
                    "spec.dataset.trainSplit",
                    f"no split {spec.train_split!r}; the dataset has {sorted(raw)}",
                )
            ]
        )
    train = raw[spec.train_split]
    fraction = spec.eval_fraction
    if spec.eval_split is not None:
        if spec.eval_split not in raw:
            raise ManifestError(
                [
                    FieldError(
                        "spec.dataset.evalSplit",
                        f"no split {spec.eval_split!r}; the dataset has {sorted(raw)}",
                    )
                ]
            )
        return train, raw[spec.eval_split]
    if fraction is None:
        for name in ("test", "validation"):
            if name in raw and name != spec.train_split:
                return train, raw[name]
        fraction = _FALLBACK_EVAL_FRACTION
    parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def cap(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or len(ds) <= n else ds.select(range(n))


def _require_columns(ds: Dataset, names: dict[str, str]) -> None:
    missing = [
        FieldError(f"spec.dataset.{field}", f"column {col!r} not in {ds.column_names}")
        for field, col in names.items()
        if col not in ds.column_names
    ]
    if missing:
        raise ManifestError(missing)


def label_names(train: Dataset, evaluation: Dataset, spec: FineTuneJobSpec) -> list[str]:
    """Class names in id order: string labels sorted, integer labels as themselves."""
    column = spec.dataset.label_field
    num_labels = spec.model.num_labels or 2
    values = set(train.unique(column)) | set(evaluation.unique(column))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if values and (min(values) < 0 or max(values) >= num_labels):
            raise ManifestError(
                [
                    FieldError(
                        "spec.model.numLabels",
                        f"labels range {min(values)}..{max(values)}, outside 0..{num_labels - 1}",
                    )
                ]
            )
        return [str(i) for i in range(num_labels)]
    names = sorted(str(v) for v in values)
    if len(names) > num_labels:
        raise ManifestError(
            [
                FieldError(
                    "spec.model.numLabels",
                    f"{len(names)} distinct labels but numLabels is {num_labels}",
                )
            ]
        )
    return names + [f"unused_{i}" for i in range(len(names), num_labels)]


def _tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]  # documents end explicitly once packed together
    return ids


def _tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """Prompt and response tokens, with loss only on the response."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=True
        )
        head, full = _as_ids(head), _as_ids(full)
        if full[: len(head)] != head:  # a template that rewrites the prompt: train on it all
            head = []
    else:
        head = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
        full = head + tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full = [*full, tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(head) + full[len(head) :]
    return full, labels


def _as_ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def tokenize(
    ds: Dataset,
    spec: FineTuneJobSpec,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[str] | None,
    *,
    pack: bool,
    drop_last: bool = True,
) -> Dataset:
    """Token ids (and labels) per row; with `pack`, causal-lm rows become maxSeqLength blocks,
    the short tail kept only when `drop_last` is false (evaluation scores every token)."""
    d, max_len = spec.dataset, spec.training.max_seq_length
    if spec.model.task != CAUSAL_LM:
        _require_columns(ds, {"textField": d.text_field, "labelField": d.label_field})
        index = {name: i for i, name in enumerate(labels or [])}

        def encode_cls(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            enc = tokenizer(batch[d.text_field], truncation=True, max_length=max_len)
            ys = [y if isinstance(y, int) else index[str(y)] for y in batch[d.label_field]]
            return {"input_ids": enc["input_ids"], "labels": ys}

        return ds.map(encode_cls, batched=True, remove_columns=ds.column_names)

    if d.prompt_field is not None and d.response_field is not None:
        _require_columns(ds, {"promptField": d.prompt_field, "responseField": d.response_field})

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            pairs = [
                _tokenize_pair(tokenizer, str(p), str(r))
                for p, r in zip(batch[d.prompt_field], batch[d.response_field], strict=True)
            ]
            return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}
    else:
        _require_columns(ds, {"textField": d.text_field})

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            ids = [_tokenize_text(tokenizer, str(t)) for t in batch[d.text_field]]
            return {"input_ids": ids, "labels": ids}

    out = ds.map(encode, batched=True, remove_columns=ds.column_names)
    if pack:
        return out.map(
            _packer(max_len, drop_last=drop_last),
            batched=True,
            batch_size=1000,
            remove_columns=out.column_names,
        )
    return out.map(
        lambda b: {k: [v[:max_len] for v in b[k]] for k in ("input_ids", "labels")}, batched=True
    )


def _packer(block: int, *, drop_last: bool):
    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
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
    """Pads a micro-batch to its longest row; with packing there is nothing to pad."""

    pad_token_id: int
    causal: bool

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.causal:
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch


class ShardedBatches:
    """Micro-batch indices for one rank: a seeded permutation per epoch, dealt round-robin.

    Every rank computes the same permutation, so no communication is needed, every rank gets the
    same number of micro-batches (the tail that does not fill a whole optimizer step on every
    rank is dropped), and a resume can start at any micro-batch of any epoch.
    """

    def __init__(
        self, n: int, batch_size: int, rank: int, world: int, accumulation: int, seed: int
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed = seed
        per_rank = n // (batch_size * world)
        self.batches_per_epoch = per_rank - per_rank % accumulation
        if self.batches_per_epoch == 0:
            raise ManifestError(
                [
                    FieldError(
                        "spec.training.batchSizePerDevice",
                        f"{n} training rows are too few for one optimizer step of "
                        f"{batch_size} x {world} ranks x {accumulation} accumulation steps",
                    )
                ]
            )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(start, self.batches_per_epoch):
            first = (b * self.world + self.rank) * self.batch_size
            yield order[first : first + self.batch_size]
