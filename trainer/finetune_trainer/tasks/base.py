"""The interface of a task type: everything that differs between causal-lm,
sequence-classification and the tasks to come.

The run (train.py), the loop, checkpoints, sharded batches, the LoRA config and the Hub push are
the same for every task; they reach the task only through `Task`. A task instance is bound to one
job's spec. This module imports no torch, so the registry stays cheap to import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from finetune_api.result import Sample

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset

    from finetune_api.v1alpha1 import FineTuneJobSpec

__all__ = ["Artifact", "Batch", "CardInfo", "Collate", "Task", "TaskData", "Timed", "untimed"]

Artifact = Literal["adapter", "merged", "full"]
Batch = dict[str, "torch.Tensor"]
# Rows of a tokenised dataset -> one padded micro-batch of tensors.
Collate = Callable[[list[dict[str, Any]]], Batch]
# Work items -> the same items, the hang watchdog timing each one's use until the next is asked
# for, and no longer once closed (watchdog.HangWatchdog.timed); `untimed` where nothing does.
Timed = Callable[[Iterable[Any]], Generator[Any, None, None]]


def untimed(items: Iterable[Any]) -> Generator[Any, None, None]:
    """The items, timed by nothing."""
    yield from items


@dataclass
class TaskData:
    """A job's data as its task prepared it, before any rank takes its share."""

    # What turns raw rows into model inputs (a tokenizer); saved next to the artifact.
    processor: Any
    train: Dataset
    evaluation: Dataset
    collate: Collate
    # Class names in id order, for a task with a classification head.
    labels: list[str] | None = None
    # Evaluation prompts to generate answers for (causal-lm with a generation metric): columns
    # prompt_ids, prompt and reference. None: evaluation generates nothing.
    prompts: Dataset | None = None


@dataclass(frozen=True)
class CardInfo:
    """What the Hub model card says differently per task."""

    # The Hub pipeline tag, also model-index's task type, e.g. text-generation.
    pipeline_tag: str
    # model-index's task name, e.g. Text Generation.
    task_name: str
    # The library that loads the pushed artifact (front matter `library_name`).
    library_name: str
    # Python that loads the pushed model, for the card's Usage section.
    usage: str
    # Task-specific rows for the card's Training table, e.g. packing.
    settings: tuple[tuple[str, object], ...] = ()
    # Tags beyond finetune-operator, the pipeline tag and the PEFT method, e.g. diffusers-training.
    tags: tuple[str, ...] = ()


class Task(ABC):
    """One value of the schema's `model.task`, registered under it in `finetune_trainer.tasks`."""

    name: ClassVar[str]

    def __init__(self, spec: FineTuneJobSpec) -> None:
        if spec.model.task != self.name:
            raise ValueError(f"{type(self).__name__} serves {self.name}, not {spec.model.task}")
        self.spec = spec
        # The scores `evaluate` returns, by name.
        self.metrics = spec.computed_metrics()
        # What the last `evaluate` generated for the first evaluation.samples prompts, as
        # Sample(after=answer), the same on every rank; empty for a task or job that generates
        # nothing. The run pairs the before and after evaluations' samples.
        self.generated: list[Sample] = []

    @abstractmethod
    def build_data(self, train: Dataset, evaluation: Dataset) -> TaskData:
        """Load the processor and turn the raw splits into model-ready rows plus their collator.

        Runs on every rank, the main process first, so `datasets` caches what the others reuse.
        """

    @abstractmethod
    def load_model(self, data: TaskData, device: torch.device) -> torch.nn.Module:
        """The base model for this data, wrapped for PEFT unless the spec's method is none.

        `device` is where this rank computes; a quantized base is loaded straight onto it. On
        the meta device the model has its shapes but no weights (sharding.loading_device).
        """

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of one micro-batch, averaged as the optimizer step expects."""

    @abstractmethod
    def evaluate(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        batches: Iterable[Batch],
        timed: Timed = untimed,
    ) -> dict[str, float]:
        """`self.metrics` on the whole evaluation split, the same on every rank.

        `batches` is a prepared loader: use `gather_for_metrics`, which drops the rows that even
        sharding duplicated. Its batches are timed already; `timed` times other work that every
        rank does together (a forward of each generated token), so that a rank lost meanwhile
        is caught as in a training step.
        """

    @abstractmethod
    def save(self, model: torch.nn.Module, data: TaskData, out: Path) -> Artifact:
        """Save what gets pushed into `out`: the adapter, the merged model or the full model."""

    @abstractmethod
    def card(self, artifact: Artifact, repo: str) -> CardInfo:
        """The model card's task-specific parts, for `artifact` pushed to `repo`."""

    def card_extras(self, artifact_dir: Path) -> tuple[dict[str, object], list[str]]:
        """What the card says about files `save` wrote besides the model (e.g. sample images):
        front matter keys (e.g. the Hub's `widget`) and Markdown lines for the body. Read from
        the artifact folder, so a kept artifact pushed by a later attempt gets the same card."""
        return {}, []
