"""Task types, one module each, registered under the schema's `model.task` value.

A new task is one module with a `Task` subclass (see `base.py`) and one line in `REGISTRY`; the
schema's `Task` literal and the metric vocabulary (`finetune_api.metrics`) name it too, and
tests/unit/test_tasks.py fails until every literal has its module.
"""

from __future__ import annotations

import importlib

from finetune_api.v1alpha1 import (
    CAUSAL_LM,
    SENTENCE_EMBEDDING,
    SEQUENCE_CLASSIFICATION,
    TEXT_TO_IMAGE,
    FineTuneJobSpec,
)
from finetune_trainer.tasks.base import Artifact, Batch, CardInfo, Task, TaskData

__all__ = [
    "REGISTRY",
    "Artifact",
    "Batch",
    "CardInfo",
    "Task",
    "TaskData",
    "task_class",
    "task_for",
]

# model.task -> "module:class" in this package, imported on first use: a task's own libraries
# (diffusers, sentence-transformers...) load only in the jobs that run it.
REGISTRY: dict[str, str] = {
    CAUSAL_LM: "causal_lm:CausalLM",
    SEQUENCE_CLASSIFICATION: "sequence_classification:SequenceClassification",
    SENTENCE_EMBEDDING: "sentence_embedding:SentenceEmbedding",
    TEXT_TO_IMAGE: "text_to_image:TextToImage",
}


def task_class(name: str) -> type[Task]:
    """The `Task` subclass registered for a `model.task` value."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise KeyError(f"no task module for model.task {name!r}; have {sorted(REGISTRY)}") from None
    module, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Task) and cls.name == name):
        raise TypeError(f"{target} is not a Task subclass named {name!r}")
    return cls


def task_for(spec: FineTuneJobSpec) -> Task:
    """The task of a job, bound to its spec."""
    return task_class(spec.model.task)(spec)
