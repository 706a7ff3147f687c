"""Evaluation scores: the scorers that compute them, perplexity and loss, and the quality gates.

The score names, their direction and which task computes which are the contract's
(`finetune_api.metrics`). A built-in scorer (`BUILTIN_SCORERS`) is an offline-safe `evaluate`
module that ships in this package under `scorers/<name>/<name>.py` and loads by path; any other
name goes to `evaluate.load(name)`, which needs the Hub. evaluate copies a module into its cache
under `HF_HOME` (`HF_MODULES_CACHE`) before importing it, so the caller's HF_HOME must be
writable; the trainer's entry point sets it, and this module leaves the environment alone.

The task modules decide what they feed a scorer; this module imports neither torch nor evaluate
until a scorer is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.metrics import METRICS, lower_is_better, metrics_of
from finetune_api.v1alpha1 import SENTENCE_EMBEDDING, TEXT_TO_IMAGE

if TYPE_CHECKING:
    import evaluate

__all__ = [
    "BUILTIN_SCORERS",
    "SCORERS_DIR",
    "ScorerUnavailable",
    "gate_failures",
    "load_scorer",
    "mean_loss",
    "perplexity",
    "score",
    "scorer_path",
]

SCORERS_DIR = Path(__file__).resolve().parent / "scorers"
# Every built-in score but `loss`, which is the model's own loss and needs no scorer, and those
# that a task computes itself: sentence-transformers' evaluators, and the UNet's denoising loss.
_LIBRARY_SCORED = frozenset(metrics_of(SENTENCE_EMBEDDING)) | frozenset(metrics_of(TEXT_TO_IMAGE))
BUILTIN_SCORERS: tuple[str, ...] = tuple(
    name for name in METRICS if name != "loss" and name not in _LIBRARY_SCORED
)


class ScorerUnavailable(RuntimeError):
    """A scorer could not be loaded; `hint` says what to do about it."""

    def __init__(self, name: str, hint: str) -> None:
        super().__init__(f"metric {name!r} is unavailable: {hint}")
        self.name = name
        self.hint = hint


def scorer_path(name: str) -> Path:
    """Folder of a built-in scorer, as `evaluate.load` takes it."""
    if name not in BUILTIN_SCORERS:
        raise KeyError(f"{name!r} is not a built-in metric; built in: {', '.join(BUILTIN_SCORERS)}")
    return SCORERS_DIR / name


def load_scorer(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a scorer: a built-in by path (no network), anything else through `evaluate.load`.

    Keyword arguments go to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id`).
    Raises ScorerUnavailable when the scorer cannot be loaded, e.g. a Hub name with no Hub.
    """
    import evaluate  # lazily: evaluate imports datasets, which is slow to import

    if name in BUILTIN_SCORERS:
        return evaluate.load(str(scorer_path(name)), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except Exception as exc:
        # evaluate raises FileNotFoundError, ConnectionError or an HTTP error depending on whether
        # the Hub is unreachable, offline mode is on, or the name does not exist.
        raise ScorerUnavailable(
            name,
            f"evaluate.load({name!r}) failed ({type(exc).__name__}: {exc}). Non-built-in metrics "
            "are downloaded from the Hugging Face Hub, which must be reachable (HF_ENDPOINT) with "
            "HF_HUB_OFFLINE unset; offline, use a built-in metric: " + ", ".join(BUILTIN_SCORERS),
        ) from exc


def score(name: str, **inputs: Any) -> float:
    """One score from its scorer: the value it returns under `name`, else its first value."""
    result = load_scorer(name).compute(**inputs)
    value = result.get(name, next(iter(result.values()))) if result else math.nan
    return float(value)


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens): per-token perplexity from summed NLL in nats.

    Sum NLL and tokens over all batches (and ranks) first; averaging per-batch perplexities
    would overweight short batches. Overflow gives inf rather than an exception, so a diverged
    model still reports (and fails a perplexity gate) instead of crashing evaluation.
    """
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf


def mean_loss(total_nll: float, count: int) -> float:
    """The `loss` score: summed NLL over the tokens or examples it covers; NaN for none."""
    return total_nll / count if count else math.nan


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def gate_failures(gates: Mapping[str, float], scores: Mapping[str, float | None]) -> list[str]:
    """Return one human-readable line per missed gate; empty when every gate passes.

    A gate on a lower-is-better score (perplexity, loss) is a maximum, on any other a minimum; a
    score equal to its threshold passes. A missing, None or NaN score fails its gate, because an
    unmeasured model must not be pushed.
    """
    failures: list[str] = []
    for metric, threshold in gates.items():
        value = scores.get(metric)
        if value is None or math.isnan(value):
            failures.append(f"{metric}: no score was computed (gate {_fmt(threshold)})")
        elif lower_is_better(metric):
            if value > threshold:
                failures.append(f"{metric} {_fmt(value)} is above the maximum {_fmt(threshold)}")
        elif value < threshold:
            failures.append(f"{metric} {_fmt(value)} is below the minimum {_fmt(threshold)}")
    return failures
