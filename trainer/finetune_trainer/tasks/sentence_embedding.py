"""sentence-embedding: a sentence-transformers model trained on (anchor, positive[, negative])
rows with MultipleNegativesRankingLoss, or on scored (anchor, positive, score) pairs with
CoSENTLoss (dataset.scoreField), LoRA through sentence-transformers' own peft support
(`add_adapter`) or in full; with training.matryoshkaDims, as MatryoshkaLoss trains it: that loss
summed over the embedding's leading sizes; with training.cachedMiniBatchSize, with gradient
caching (GradCache: sentence-transformers' CachedMultipleNegativesRankingLoss). Scored by
sentence-transformers' evaluators on the held-out rows: InformationRetrievalEvaluator (each anchor
queries the held-out positives and negatives) and EmbeddingSimilarityEvaluator
(spearman_cosine), under the evaluators' own metric keys, and at a Matryoshka size d (their
`truncate_dim`) as dim_<d>_<key>."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import PeftModel, TaskType
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
)
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    CoSENTLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.matryoshka import shrink
from sentence_transformers.util import cos_sim
from transformers import PreTrainedTokenizerBase

from finetune_api import FieldError, ManifestError
from finetune_api.metrics import split_truncated, truncated
from finetune_api.v1alpha1 import SENTENCE_EMBEDDING, FineTuneJobSpec
from finetune_trainer import data, modeling
from finetune_trainer.evaluation import evaluating, scores_from_main
from finetune_trainer.model_card import source_id
from finetune_trainer.sources import downloading
from finetune_trainer.tasks.base import (
    Artifact,
    Batch,
    CardInfo,
    Task,
    TaskData,
    Timed,
    untimed,
)

__all__ = ["Collator", "SentenceEmbedding", "columns", "text_rows"]

log = logging.getLogger(__name__)

# The canonical column names inside TaskData, whatever the spec calls them (sentence-transformers'
# own convention for (anchor, positive, negative) datasets).
ANCHOR, POSITIVE, NEGATIVE = "anchor", "positive", "negative"
# A scored pair's similarity (dataset.scoreField), 0..1, and the batch key it travels under.
SCORE, LABELS = "score", "labels"
_SIMILARITY_METRICS = frozenset({"spearman_cosine"})


def columns(spec: FineTuneJobSpec) -> dict[str, str]:
    """Spec field -> the dataset column it names, in anchor, positive, negative order."""
    d = spec.dataset
    named = {"anchorField": d.anchor_field, "positiveField": d.positive_field}
    if d.negative_field is not None:
        named["negativeField"] = d.negative_field
    return named


def text_rows(ds: Dataset, spec: FineTuneJobSpec) -> Dataset:
    """The anchor, positive (and negative) columns under their canonical names, every value a
    non-empty string: a row that is not text fails as InvalidDataset, naming the column."""
    named = columns(spec)
    data.require_columns(ds, named)
    canonical = dict(zip(named.values(), (ANCHOR, POSITIVE, NEGATIVE), strict=False))
    rows = ds.select_columns(list(named.values())).rename_columns(
        {src: dst for src, dst in canonical.items() if src != dst}
    )
    for field, column in zip(named, (ANCHOR, POSITIVE, NEGATIVE), strict=False):
        values = list(rows[column])
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        _refuse(field, bad, f"no text in column {named[field]!r}")
    score = spec.dataset.score_field
    if score is None:
        return rows
    data.require_columns(ds, {"scoreField": score})
    values = list(ds[score])
    bad = [i for i, v in enumerate(values) if not _is_score(v)]
    _refuse("scoreField", bad, f"no score from 0 to 1 in column {score!r}")
    return rows.add_column(SCORE, [float(v) for v in values])


def _is_score(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _refuse(field: str, rows: list[int], what: str) -> None:
    """The rows that are not what `field` says, as an InvalidDataset naming it; none: nothing."""
    if rows:
        raise ManifestError(
            [FieldError(f"spec.dataset.{field}", f"{len(rows)} rows have {what} (row {rows[0]})")]
        )


@dataclass
class Collator:
    """Tokenizes a micro-batch's columns into one padded batch, column after column (all anchors,
    then all positives, then all negatives), so that the model embeds them in one forward pass
    (one DDP forward per backward) and `loss` splits the embeddings back by column."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    names: tuple[str, ...]
    scored: bool = False  # the rows carry a SCORE, which the batch carries as LABELS

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        texts = [row[name] for name in self.names for row in rows]
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if self.scored:
            batch[LABELS] = torch.tensor([row[SCORE] for row in rows], dtype=torch.float32)
        return batch


class SentenceEmbedding(Task):
    name = SENTENCE_EMBEDDING

    def __init__(self, spec: FineTuneJobSpec) -> None:
        super().__init__(spec)
        self.names: tuple[str, ...] = (ANCHOR, POSITIVE, NEGATIVE)[: len(columns(spec))]
        # The evaluators need the whole held-out split as text, not sharded token batches:
        # build_data keeps it here (every rank builds it; rank 0 evaluates).
        self.held_out: Dataset | None = None
        self.scored = spec.dataset.score_field is not None
        self._loss: MultipleNegativesRankingLoss | CoSENTLoss | None = None
        # With cachedMiniBatchSize, sentence-transformers' own cached loss (wrapped in its
        # MatryoshkaLoss with sizes): it embeds the mini-batches itself, twice.
        self._cached: CachedMultipleNegativesRankingLoss | MatryoshkaLoss | None = None
        # matryoshkaDims, largest first; () trains the whole embedding only.
        self.sizes = spec.training.matryoshka_sizes

    def build_data(self, train: Dataset, evaluation: Dataset) -> TaskData:
        tokenizer = modeling.load_tokenizer(self.spec.model)
        with data.dataset_errors():  # the tokenizer is the model's; from here on, the data's
            rows = text_rows(train, self.spec)
            self.held_out = text_rows(evaluation, self.spec)
        return TaskData(
            processor=tokenizer,
            train=rows,
            evaluation=self.held_out,
            collate=Collator(tokenizer, self._max_length(tokenizer), self.names, self.scored),
        )

    def _max_length(self, tokenizer: PreTrainedTokenizerBase) -> int:
        # maxSeqLength, but never past the positions the model has.
        limit = getattr(tokenizer, "model_max_length", None) or self.spec.training.max_seq_length
        return min(self.spec.training.max_seq_length, int(limit))

    def _load_base(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> SentenceTransformer:
        model = self.spec.model
        location, revision = modeling.source_location(model.source), modeling.pinned_revision(model)
        with downloading("model", location, revision) as token:
            st = SentenceTransformer(
                location,
                revision=revision,
                token=token,
                device=str(device),
                local_files_only=modeling.cached_only(model),
                model_kwargs={"dtype": dtype},
            )
        st.max_seq_length = min(st.max_seq_length or math.inf, self.spec.training.max_seq_length)
        return st

    def load_model(self, data: TaskData, device: torch.device) -> torch.nn.Module:
        # A LoRA's frozen base at the compute precision (training.precision), as causal-lm's.
        dtype = modeling.weights_dtype(self.spec.training.precision, self.spec.peft.method)
        st = self._load_base(device, dtype)
        self._check_sizes(st)
        if self.spec.peft.method != "none":
            # LoRA through sentence-transformers' peft support, on the underlying transformer.
            config = modeling.lora_config(self.spec.peft, TaskType.FEATURE_EXTRACTION)
            # A head the pooling never reads (BERT's pooler) would get no gradient, which DDP
            # refuses; the pooling of a sentence-transformers model reads the token embeddings.
            config.exclude_modules = _head_linears(st) or None
            st.add_adapter(config)
            modeling.trainable_in_fp32(st)  # peft made LoRA's weights in the base's dtype
        else:
            for name in _unused_heads(st):
                st.transformers_model.get_submodule(name).requires_grad_(False)
        if modeling.gradient_checkpointing(self.spec):
            # Non-reentrant, as modeling.load_model: it passes gradients to LoRA's weights
            # through layers whose own weights are frozen, and keeps DDP's hooks intact.
            st.gradient_checkpointing_enable({"use_reentrant": False})
        # The loss holds the model only for its own forward, which `loss` does not use: the
        # embeddings come from the prepared (DDP) model. Gathered across ranks, every rank's
        # anchors see every rank's positives (and negatives) as in-batch negatives. CoSENT
        # ranks the pairs of a rank's own batch by their scores; DDP averages the ranks' losses.
        # The schema keeps cachedMiniBatchSize off scored pairs: one of the three losses trains.
        mini_batch = self.spec.training.cached_mini_batch_size
        if mini_batch is not None:
            cached = CachedMultipleNegativesRankingLoss(
                st, mini_batch_size=mini_batch, gather_across_devices=True
            )
            self._cached = MatryoshkaLoss(st, cached, list(self.sizes)) if self.sizes else cached
        elif self.scored:
            self._loss = CoSENTLoss(st)
        else:
            self._loss = MultipleNegativesRankingLoss(st, gather_across_devices=True)
        log.info("loss: %s", self.loss_name())
        return st

    def _check_sizes(self, st: SentenceTransformer) -> None:
        """A Matryoshka size past the model's embedding is the spec's to fix, before training
        (MatryoshkaLoss would raise a ValueError at the first step)."""
        full = st.get_embedding_dimension()
        too_large = [d for d in self.sizes if full is not None and d > full]
        if too_large:
            raise ManifestError(
                [
                    FieldError(
                        "spec.training.matryoshkaDims",
                        f"{too_large[0]} is larger than the model's embedding ({full} dimensions)",
                    )
                ]
            )

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        features = {k: v for k, v in batch.items() if k != LABELS}
        if self._cached is not None:
            return _cached_loss(self._cached, model, features, len(self.names))
        if self._loss is None:
            raise RuntimeError("load_model first: the loss is built with the model")
        labels = batch.get(LABELS)  # a scored pair's score; None for MultipleNegativesRanking
        embeddings = model(features)["sentence_embedding"]
        by_column = list(embeddings.chunk(len(self.names)))
        if not self.sizes:
            return self._loss.compute_loss_from_embeddings(by_column, labels)  # type: ignore[arg-type]
        # MatryoshkaLoss's sum, each size weighted 1: the loss of the leading `d` values of each
        # embedding, normalised again (its `shrink`), all from the one forward pass.
        losses = [
            self._loss.compute_loss_from_embeddings([shrink(e, d) for e in by_column], labels)  # type: ignore[arg-type]
            for d in self.sizes
        ]
        return torch.stack(losses).sum()

    def evaluate(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        batches: Iterable[Batch],
        timed: Timed = untimed,
    ) -> dict[str, float]:
        st = accelerator.unwrap_model(model)
        with evaluating(model):
            return scores_from_main(accelerator, lambda: self._scores(st))

    def _scores(self, st: SentenceTransformer) -> dict[str, float]:
        # The evaluators run once per embedding size that a metric asks for (None: whole).
        by_size: dict[int | None, set[str]] = {}
        for name in self.metrics:
            size, score = split_truncated(name)
            by_size.setdefault(size, set()).add(score)
        found: dict[str, float] = {}
        for size, scores in by_size.items():
            at = self._scores_at(st, scores, size)
            found |= at if size is None else {truncated(size, k): v for k, v in at.items()}
        return {name: float(found.get(name, math.nan)) for name in self.metrics}

    def _scores_at(
        self, st: SentenceTransformer, scores: set[str], size: int | None
    ) -> dict[str, float]:
        """The evaluators' `scores` (their own keys) with every embedding cut to its first
        `size` values (`truncate_dim`; None: whole)."""
        if self.held_out is None:
            raise RuntimeError("build_data first: it keeps the held-out split")
        rows = self.held_out
        anchors, positives = list(rows[ANCHOR]), list(rows[POSITIVE])
        negatives = list(rows[NEGATIVE]) if NEGATIVE in rows.column_names else None
        found: dict[str, float] = {}
        if scores - _SIMILARITY_METRICS:
            corpus = {f"p{i}": text for i, text in enumerate(positives)}
            corpus |= {f"n{i}": text for i, text in enumerate(negatives or [])}
            ir = InformationRetrievalEvaluator(
                queries={f"q{i}": text for i, text in enumerate(anchors)},
                corpus=corpus,
                relevant_docs={f"q{i}": {f"p{i}"} for i in range(len(anchors))},
                accuracy_at_k=[1, 10],
                precision_recall_at_k=[10],
                score_functions={"cosine": cos_sim},
                write_csv=False,
                batch_size=32,
                truncate_dim=size,
            )
            found |= ir(st)
        if scores & _SIMILARITY_METRICS:
            if SCORE in rows.column_names:  # scored pairs: against their own scores
                pairs = (anchors, positives, list(rows[SCORE]))
            else:
                # Matching pairs score 1, others 0: the anchor with its negative, or without a
                # negative column with the next row's positive.
                others = negatives or positives[1:] + positives[:1]
                pairs = (
                    anchors + anchors,
                    positives + others,
                    [1.0] * len(anchors) + [0.0] * len(anchors),
                )
            similarity = EmbeddingSimilarityEvaluator(
                sentences1=pairs[0],
                sentences2=pairs[1],
                scores=pairs[2],
                similarity_fn_names=["cosine"],
                write_csv=False,
                batch_size=32,
                truncate_dim=size,
            )
            found |= similarity(st)
        return found

    def _column_names(self) -> list[str]:
        """The dataset's columns the job reads: its texts, and a scored pair's score."""
        score = self.spec.dataset.score_field
        return [*columns(self.spec).values(), *([score] if score else [])]

    def save(self, model: torch.nn.Module, data: TaskData, out: Path) -> Artifact:
        kind = modeling.artifact_kind(self.spec)
        st: SentenceTransformer = model  # type: ignore[assignment]
        if kind == "merged":
            st = self._merged(st)
        # modules.json, the pooling, the tokenizer and the weights (or, for an adapter, the
        # adapter files, which SentenceTransformer(repo) loads over its base). The card is ours.
        st.save_pretrained(str(out), create_model_card=False)
        return kind

    def _merged(self, st: SentenceTransformer) -> SentenceTransformer:
        """The adapter merged into a fresh copy of the base, as modeling does for transformers."""
        base = self._load_base()
        with tempfile.TemporaryDirectory() as adapter:
            st.transformers_model.save_pretrained(adapter)
            merged = PeftModel.from_pretrained(base.transformers_model, adapter).merge_and_unload()
        base[0].model = merged
        return base

    def loss_name(self) -> str:
        """The loss that trains the job, as the card and the log name it."""
        mini_batch = self.spec.training.cached_mini_batch_size
        if self.scored:
            loss = "CoSENTLoss (pairs ranked by their scores)"
        elif mini_batch is not None:
            loss = (
                f"CachedMultipleNegativesRankingLoss (GradCache, mini-batches of {mini_batch}; "
                "in-batch negatives gathered across ranks)"
            )
        else:
            loss = "MultipleNegativesRankingLoss (in-batch negatives gathered across ranks)"
        if self.sizes:
            sizes = ", ".join(str(d) for d in self.sizes)
            loss = f"MatryoshkaLoss ({sizes} dimensions) over {loss}"
        return loss

    def card(self, artifact: Artifact, repo: str) -> CardInfo:
        base = source_id(self.spec.model.source) or "<base model>"
        usage = [
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{repo}")',
            'embeddings = model.encode(["a query", "a matching document"])',
            "print(model.similarity(embeddings[0:1], embeddings[1:]))",
        ]
        if artifact == "adapter":
            usage.insert(2, f"# the adapter loads over its base, {base}")
        if self.sizes:
            usage += [
                "",
                "# Matryoshka: the leading dimensions alone are an embedding too",
                f'small = SentenceTransformer("{repo}", truncate_dim={self.sizes[-1]})',
            ]
        return CardInfo(
            pipeline_tag="sentence-similarity",
            task_name="Semantic Similarity",
            library_name="sentence-transformers",
            usage="\n".join(usage),
            settings=(
                ("loss", self.loss_name()),
                ("columns", ", ".join(self._column_names())),
            ),
        )


def _cached_loss(
    loss: CachedMultipleNegativesRankingLoss | MatryoshkaLoss,
    model: torch.nn.Module,
    features: Batch,
    columns: int,
) -> torch.Tensor:
    """GradCache: the loss of the whole batch, with a hook on it that embeds each mini-batch
    again, with gradients, when the loop's backward pass reaches it."""
    cached = loss.loss if isinstance(loss, MatryoshkaLoss) else loss
    # The prepared model (DDP), not the one the loss was built with: the replay then runs every
    # mini-batch but the last under no_sync, and the last one's backward pass all-reduces the
    # accumulated gradients once, as one forward pass's would.
    cached.model = model
    # The collator's one batch, column after column, as the per-column features that
    # sentence-transformers' losses take (the padding the columns share is cut per mini-batch).
    per_column = zip(*(v.chunk(columns) for v in features.values()), strict=True)
    return loss([dict(zip(features, parts, strict=True)) for parts in per_column], None)


def _unused_heads(st: SentenceTransformer) -> list[str]:
    """Submodules of the transformer that its forward computes but the sentence embedding never
    reads: BERT-style poolers."""
    model = st.transformers_model
    heads = [(name, m) for name, m in model.named_children() if name == "pooler"] if model else []
    return [name for name, _ in heads]


def _head_linears(st: SentenceTransformer) -> list[str]:
    """The linear layers of `_unused_heads`, which peft's all-linear would otherwise adapt."""
    model = st.transformers_model
    return [
        f"{head}.{name}" if name else head
        for head in _unused_heads(st)
        for name, m in model.get_submodule(head).named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
