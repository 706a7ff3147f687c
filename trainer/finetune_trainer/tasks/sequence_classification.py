"""sequence-classification: a new classification head over the base model, one label per text.
Labels are integers 0..numLabels-1, or strings mapped to ids in sorted order. Scored by the
built-in scorers (accuracy, f1, precision, recall) or a Hub metric, and by the loss."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import TaskType
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from finetune_api import FieldError, ManifestError
from finetune_api.v1alpha1 import SEQUENCE_CLASSIFICATION, FineTuneJobSpec
from finetune_trainer import data, modeling
from finetune_trainer.evaluation import evaluating, scores_from_main
from finetune_trainer.map_cache import map_fingerprint
from finetune_trainer.model_card import source_id, transformers_usage
from finetune_trainer.scoring import mean_loss, score
from finetune_trainer.tasks.base import (
    Artifact,
    Batch,
    CardInfo,
    Task,
    TaskData,
    Timed,
    untimed,
)

__all__ = ["Collator", "SequenceClassification", "label_names", "tokenize"]

# Scores that average per-class values: macro beyond two classes, as the card describes them.
_AVERAGED = frozenset({"f1", "precision", "recall"})


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


def tokenize(
    ds: Dataset, spec: FineTuneJobSpec, tokenizer: PreTrainedTokenizerBase, labels: list[str]
) -> Dataset:
    """Token ids (truncated to maxSeqLength) and the label id of each row."""
    d, max_len = spec.dataset, spec.training.max_seq_length
    data.require_columns(ds, {"textField": d.text_field, "labelField": d.label_field})
    index = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tokenizer(batch[d.text_field], truncation=True, max_length=max_len)
        ys = [y if isinstance(y, int) else index[str(y)] for y in batch[d.label_field]]
        return {"input_ids": enc["input_ids"], "labels": ys}

    shape = (d.model_dump(mode="json"), max_len, labels, tokenizer)
    return ds.map(
        encode,
        batched=True,
        remove_columns=ds.column_names,
        new_fingerprint=map_fingerprint(ds, "tokenize", *shape),
    )


@dataclass
class Collator:
    """Pads a micro-batch to its longest row; one label id per row."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        batch = data.pad_inputs(rows, self.pad_token_id)
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch


class SequenceClassification(Task):
    name = SEQUENCE_CLASSIFICATION
    # LoRA on the base, and the new head trained in full (peft's modules_to_save).
    peft_task_type: ClassVar[TaskType] = TaskType.SEQ_CLS

    @property
    def num_labels(self) -> int:
        return self.spec.model.num_labels or 2

    def build_data(self, train: Dataset, evaluation: Dataset) -> TaskData:
        tokenizer = modeling.load_tokenizer(self.spec.model)
        with data.dataset_errors():  # the tokenizer is the model's; from here on, the data's
            labels = label_names(train, evaluation, self.spec)
            rows = tokenize(train, self.spec, tokenizer, labels)
            eval_rows = tokenize(evaluation, self.spec, tokenizer, labels)
        return TaskData(
            processor=tokenizer,
            train=rows,
            evaluation=eval_rows,
            collate=Collator(tokenizer.pad_token_id),
            labels=labels,
        )

    def _load_base(self, labels: list[str] | None) -> modeling.BaseLoader:
        names = labels or [str(i) for i in range(self.num_labels)]
        return modeling.BaseLoader(
            AutoModelForSequenceClassification,
            self.spec.model,
            num_labels=self.spec.model.num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )

    def load_model(self, data: TaskData, device: torch.device) -> torch.nn.Module:
        return modeling.load_model(
            self.spec,
            self._load_base(data.labels),
            data.processor.pad_token_id,
            self.peft_task_type,
            device,
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # Cross-entropy of the head's logits against the label ids, averaged over the rows.
        return model(**batch).loss

    def evaluate(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        batches: Iterable[Batch],
        timed: Timed = untimed,
    ) -> dict[str, float]:
        nll_sum, count = 0.0, 0
        predictions: list[torch.Tensor] = []
        references: list[torch.Tensor] = []
        with evaluating(model):
            for batch in batches:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                nll = torch.nn.functional.cross_entropy(
                    logits.float(), batch["labels"], reduction="none"
                )
                preds, refs, nll = accelerator.gather_for_metrics(
                    (logits.argmax(-1), batch["labels"], nll)
                )
                predictions.append(preds.cpu())
                references.append(refs.cpu())
                nll_sum += float(nll.double().sum())
                count += len(refs)  # `loss` is per example: one prediction each
        preds_list = torch.cat(predictions).tolist() if predictions else []
        refs_list = torch.cat(references).tolist() if references else []
        return scores_from_main(
            accelerator, lambda: self._scores(nll_sum, count, preds_list, refs_list)
        )

    def _scores(
        self, nll_sum: float, count: int, predictions: list[int], references: list[int]
    ) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name in self.metrics:
            if name == "loss":
                scores[name] = mean_loss(nll_sum, count)
                continue
            # The automatic average of a two-class task is of class 1 alone ("binary").
            kwargs = {"average": "macro"} if name in _AVERAGED and self.num_labels > 2 else {}
            scores[name] = score(name, predictions=predictions, references=references, **kwargs)
        return scores

    def save(self, model: torch.nn.Module, data: TaskData, out: Path) -> Artifact:
        return modeling.save_artifact(
            model, data.processor, self.spec, out, self._load_base(data.labels)
        )

    def card(self, artifact: Artifact, repo: str) -> CardInfo:
        return CardInfo(
            pipeline_tag="text-classification",
            task_name="Text Classification",
            library_name="peft" if artifact == "adapter" else "transformers",
            usage=transformers_usage(
                "AutoModelForSequenceClassification",
                source_id(self.spec.model.source),
                repo,
                artifact,
            ),
        )
