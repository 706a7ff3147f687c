"""Datasets, the part every task shares: loading, the train/eval split, padding and the
sharded batches of each rank. Tokenisation is the task's (`finetune_trainer.tasks`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from finetune_api import FieldError, ManifestError
from finetune_api.v1alpha1 import DatasetSpec, FineTuneJobSpec
from finetune_trainer import fetch
from finetune_trainer.modeling import source_location
from finetune_trainer.sources import downloading

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_FALLBACK_EVAL_FRACTION = 0.1
# Errors from these packages are the network's or the Hub's: another attempt may succeed, or
# another reason (ModelNotFound, DatasetNotFound) says what is wrong.
_NOT_THE_DATA = frozenset({"requests", "httpx", "urllib3", "aiohttp", "huggingface_hub"})


class DatasetError(Exception):
    """The dataset cannot be read or does not fit the spec: every attempt would fail the same
    way, so the job fails at once with reason InvalidDataset."""


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _not_the_data(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a network or Hub error rather than the data's."""
    return any(
        isinstance(e, ConnectionError | TimeoutError)
        or type(e).__module__.split(".")[0] in _NOT_THE_DATA
        or type(e).__name__ == "DatasetNotFoundError"
        for e in _chain(exc)
    )


@contextmanager
def dataset_errors() -> Iterator[None]:
    """Whatever goes wrong in the block while reading or shaping the rows (a missing column, a
    file that does not parse or cannot be read, an error in a map) becomes a DatasetError;
    network and Hub errors pass unchanged."""
    try:
        yield
    except DatasetError:
        raise
    except ManifestError as exc:  # the spec's fields that the data does not match
        raise DatasetError(str(exc)) from exc
    except Exception as exc:
        if _not_the_data(exc):
            raise
        message = f"{type(exc).__name__}: {exc}"
        root = _chain(exc)[-1]
        if root is not exc:  # "An error occurred while generating the dataset" says little
            message += f" (caused by {type(root).__name__}: {root})"
        raise DatasetError(message) from exc


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
    fetched = fetch.pinned("dataset", spec.source)
    if fetched is not None:
        # The commit every rank loads, from the snapshot fetched once (fetch.py): no Hub request.
        loaded = load_dataset(str(fetched[1]), spec.config)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if spec.source.startswith("hf://"):
        # A 404 is DatasetNotFound, not a retry; the dataset's own token (sources.downloading).
        with downloading("dataset", location, spec.revision) as token:
            return load_dataset(location, spec.config, revision=spec.revision, token=token)
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


def load_splits(spec: FineTuneJobSpec) -> tuple[Dataset, Dataset]:
    """The raw train and eval splits of a job, capped by the maxSamples of each."""
    with dataset_errors():
        train, evaluation = split(load_raw(spec.dataset), spec.dataset, spec.training.seed)
    return cap(train, spec.dataset.max_samples), cap(evaluation, spec.evaluation.max_samples)


def require_columns(ds: Dataset, names: dict[str, str]) -> None:
    """Fail on the spec field (`names`: field -> column) whose column the dataset lacks."""
    missing = [
        FieldError(f"spec.dataset.{field}", f"column {col!r} not in {ds.column_names}")
        for field, col in names.items()
        if col not in ds.column_names
    ]
    if missing:
        raise ManifestError(missing)


def pad_inputs(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` padded on the right to the longest row, and the matching attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


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
