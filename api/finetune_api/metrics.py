"""The evaluation vocabulary of the schema: the built-in score names, their direction, the task
that computes each, and the defaults of `spec.evaluation.metrics`.

"metrics" here means evaluation scores, as the spec field is named; the trainer's Prometheus
series are its telemetry and have names of their own. For causal-lm and sequence-classification,
any other name in `evaluation.metrics` is loaded by the trainer through `evaluate` from the Hub
and counts as higher-is-better; sentence-embedding and text-to-image compute their own scores
only (sentence-embedding also at each Matryoshka size, `truncated`).

Task names are spelled here as on the wire (`v1alpha1.Task`): v1alpha1 imports this module, so
this one cannot import it back. tests/unit/test_tasks.py checks the two agree.
"""

import re
from dataclasses import dataclass, replace
from typing import Final

_CAUSAL_LM: Final = "causal-lm"
_SEQUENCE_CLASSIFICATION: Final = "sequence-classification"
_SENTENCE_EMBEDDING: Final = "sentence-embedding"
_TEXT_TO_IMAGE: Final = "text-to-image"


@dataclass(frozen=True)
class Metric:
    """A built-in evaluation score: computed offline, before and after training."""

    name: str
    display_name: str
    tasks: tuple[str, ...]
    lower_is_better: bool
    description: str
    # Scored on text the model generates for the evaluation prompts, not on its logits: costs a
    # generate() pass, and needs prompts (promptField/responseField or messagesField).
    generation: bool = False


BUILTIN_METRICS: Final[tuple[Metric, ...]] = (
    Metric(
        "perplexity",
        "Perplexity",
        (_CAUSAL_LM,),
        lower_is_better=True,
        description="exp of the mean next-token negative log-likelihood over every scored token "
        "of the evaluation split",
    ),
    Metric(
        "loss",
        "Loss",
        (_CAUSAL_LM, _SEQUENCE_CLASSIFICATION),
        lower_is_better=True,
        description="mean negative log-likelihood (nats): per scored token for causal-lm, per "
        "example for sequence-classification",
    ),
    Metric(
        "exact_match",
        "Exact Match",
        (_CAUSAL_LM,),
        lower_is_better=False,
        description="fraction of evaluation prompts whose generated answer equals the reference "
        "response, after stripping surrounding whitespace",
        generation=True,
    ),
    Metric(
        "rouge",
        "ROUGE-L",
        (_CAUSAL_LM,),
        lower_is_better=False,
        description="mean ROUGE-L F1 (longest common subsequence of words) of generated answers "
        "against the reference responses, 0 to 1",
        generation=True,
    ),
    Metric(
        "bleu",
        "BLEU",
        (_CAUSAL_LM,),
        lower_is_better=False,
        description="corpus BLEU (sacrebleu, 13a tokenisation) of generated answers against the "
        "reference responses, 0 to 100",
        generation=True,
    ),
    Metric(
        "chrf",
        "chrF",
        (_CAUSAL_LM,),
        lower_is_better=False,
        description="corpus chrF (sacrebleu: character 6-grams, beta 2) of generated answers "
        "against the reference responses, 0 to 100",
        generation=True,
    ),
    Metric(
        "accuracy",
        "Accuracy",
        (_SEQUENCE_CLASSIFICATION,),
        lower_is_better=False,
        description="fraction of evaluation examples whose predicted class is their label",
    ),
    Metric(
        "f1",
        "F1",
        (_SEQUENCE_CLASSIFICATION,),
        lower_is_better=False,
        description="harmonic mean of precision and recall; of class 1 with two classes, "
        "macro-averaged over the classes beyond two",
    ),
    Metric(
        "precision",
        "Precision",
        (_SEQUENCE_CLASSIFICATION,),
        lower_is_better=False,
        description="fraction of predictions of a class that are right; of class 1 with two "
        "classes, macro-averaged beyond two",
    ),
    Metric(
        "recall",
        "Recall",
        (_SEQUENCE_CLASSIFICATION,),
        lower_is_better=False,
        description="fraction of examples of a class predicted as that class; of class 1 with "
        "two classes, macro-averaged beyond two",
    ),
    # sentence-embedding: the keys of sentence-transformers' own evaluators, unchanged, so the
    # numbers in status, gates and Prometheus read as that library prints them.
    *(
        Metric(
            f"cosine_{kind}@{k}",
            f"{title}@{k}",
            (_SENTENCE_EMBEDDING,),
            lower_is_better=False,
            description=f"{text} (InformationRetrievalEvaluator, cosine similarity): each held-out "
            "anchor queries the held-out positives (and negatives)",
        )
        for kind, title, k, text in (
            ("ndcg", "NDCG", 10, "normalised discounted cumulative gain of the top 10"),
            ("mrr", "MRR", 10, "mean reciprocal rank of the anchor's positive in the top 10"),
            ("map", "MAP", 100, "mean average precision of the top 100"),
            ("accuracy", "Accuracy", 1, "fraction of anchors whose top hit is their positive"),
            ("recall", "Recall", 10, "fraction of anchors whose positive is in the top 10"),
        )
    ),
    Metric(
        "spearman_cosine",
        "Spearman (cosine)",
        (_SENTENCE_EMBEDDING,),
        lower_is_better=False,
        description="Spearman rank correlation of cosine similarity with the pair's label "
        "(EmbeddingSimilarityEvaluator): 1 for anchor and positive, 0 for anchor and negative, "
        "or anchor and the next row's positive when there is no negative column",
    ),
    Metric(
        "denoising_loss",
        "Denoising loss",
        (_TEXT_TO_IMAGE,),
        lower_is_better=True,
        description="mean squared error of the UNet's prediction (the noise, or the velocity "
        "with v-prediction) on the evaluation images, each noised at a fixed seed and timestep "
        "(spread evenly over the schedule), so that before and after compare like with like",
    ),
)
METRICS: Final[dict[str, Metric]] = {m.name: m for m in BUILTIN_METRICS}

# The scores only sequence-classification computes, in the order the CRD's CEL rule lists them.
CLASSIFICATION_METRICS: Final = tuple(
    m.name for m in BUILTIN_METRICS if m.tasks == (_SEQUENCE_CLASSIFICATION,)
)
# The scores computed on generated text, in vocabulary order.
GENERATION_METRICS: Final = tuple(m.name for m in BUILTIN_METRICS if m.generation)
# What an empty `evaluation.metrics` means, per task.
DEFAULT_METRICS: Final[dict[str, list[str]]] = {
    _CAUSAL_LM: ["perplexity"],
    _SEQUENCE_CLASSIFICATION: ["accuracy"],
    _SENTENCE_EMBEDDING: ["cosine_ndcg@10", "cosine_mrr@10", "cosine_accuracy@1"],
    _TEXT_TO_IMAGE: ["denoising_loss"],
}


def metrics_of(task: str) -> tuple[str, ...]:
    """The built-in scores that `task` computes."""
    return tuple(m.name for m in BUILTIN_METRICS if task in m.tasks)


def foreign_metrics(task: str) -> tuple[str, ...]:
    """The built-in scores of other tasks, which `task` cannot compute: the spec rejects them."""
    return tuple(m.name for m in BUILTIN_METRICS if task not in m.tasks)


# sentence-embedding's scores of scored pairs (dataset.scoreField): the rank correlation of the
# cosine with the pairs' own scores. Retrieval needs an anchor's one matching text, which a
# scored pair need not be.
SCORED_PAIR_METRICS: Final = ("spearman_cosine",)
# sentence-transformers' own key for an evaluator named dim_<d>: its score with the embedding
# cut to its first d dimensions (`truncate_dim`). The size has at most 5 digits (matryoshkaDims
# <= 65536), so that the CRD's CEL may convert it to an int without overflow.
TRUNCATED_PREFIX: Final = "dim_"
TRUNCATED_PREFIX_PATTERN: Final = TRUNCATED_PREFIX + "([1-9][0-9]{0,4})_"
_TRUNCATED = re.compile(TRUNCATED_PREFIX_PATTERN + "(.+)")


def truncated(dim: int, name: str) -> str:
    """The key of score `name` of the embedding cut to its first `dim` dimensions, as
    sentence-transformers' evaluators spell it with name=f"dim_{dim}" (dim_64_cosine_ndcg@10)."""
    return f"{TRUNCATED_PREFIX}{dim}_{name}"


def split_truncated(name: str) -> tuple[int | None, str]:
    """(dim, score) of a `truncated` key; (None, name) for any other name."""
    found = _TRUNCATED.fullmatch(name)
    return (int(found[1]), found[2]) if found else (None, name)


def embedding_metrics(matryoshka_dims: list[int] | None, scored: bool = False) -> tuple[str, ...]:
    """Every name sentence-embedding computes: its built-in scores (SCORED_PAIR_METRICS for
    scored pairs), and with training.matryoshkaDims each of them again per size (`truncated`)."""
    builtin = SCORED_PAIR_METRICS if scored else metrics_of(_SENTENCE_EMBEDDING)
    return builtin + tuple(truncated(d, m) for d in matryoshka_dims or () for m in builtin)


def default_metrics(task: str, scored: bool = False) -> list[str]:
    """What an empty `evaluation.metrics` means for `task` (`scored`: sentence-embedding's pairs
    carry scores, dataset.scoreField)."""
    if scored and task == _SENTENCE_EMBEDDING:
        return list(SCORED_PAIR_METRICS)
    return DEFAULT_METRICS[task]


def effective_metrics(
    task: str,
    requested: list[str],
    matryoshka_dims: list[int] | None = None,
    scored: bool = False,
) -> list[str]:
    """The scores a job computes: `evaluation.metrics`, or the task's defaults when empty, and
    with training.matryoshkaDims the first of them again at each size (the headline score that
    sentence-transformers' Matryoshka examples tabulate per size)."""
    if requested:
        return list(requested)
    defaults = default_metrics(task, scored)
    return defaults + [truncated(d, defaults[0]) for d in matryoshka_dims or ()]


def needs_generation(metrics: list[str]) -> bool:
    """Whether any of `metrics` is scored on generated text (a generate() pass per evaluation)."""
    return any(name in GENERATION_METRICS for name in metrics)


def builtin_metric(name: str) -> Metric | None:
    """The built-in score `name` names, a `truncated` one included (as its score, described at
    its size); None for a Hub metric."""
    dim, base = split_truncated(name)
    found = METRICS.get(base)
    if found is None or dim is None:
        return found if dim is None else None
    return replace(
        found,
        name=name,
        display_name=f"{found.display_name} ({dim} dims)",
        description=f"{found.description}; the embedding cut to its first {dim} dimensions",
    )


def lower_is_better(name: str) -> bool:
    """Whether a smaller score is the better one; False for names outside the vocabulary."""
    found = builtin_metric(name)
    return found is not None and found.lower_is_better


def display_name(name: str) -> str:
    """The display name of a score: "Perplexity" for perplexity, a Hub metric's own name as is."""
    found = builtin_metric(name)
    return found.display_name if found else name
