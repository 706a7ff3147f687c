"""Sources that do not exist: a model or dataset the endpoint does not have, or a missing path.

Retrying cannot make them appear, so the rank reports `ModelNotFound` or `DatasetNotFound`, which
exit with a permanent code (finetune_api.result), instead of spending the job's attempts. The
message names the endpoint that was asked (huggingface_hub's, from HF_ENDPOINT, which
`env.configure_hub_env` sets from output.hub.endpoint), not the huggingface.co that
transformers' own message always names.


Which token reads a source is decided here too (`read_token`): its own read token, else the push
token, as the pod contract (finetune_api.pod) spells them. `downloading` wraps every download of a
source with both: its token, and its not-found report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from finetune_api import FineTuneJob, pod
from finetune_api.constants import Reason

# The model, the dataset, and text-to-image's model.vae (a part of the model from a repo of its
# own: read with the model's token, missing as the model is).
SourceKind = Literal["model", "dataset", "vae"]


@dataclass(frozen=True)
class _Source:
    field: str  # the spec field that names it
    token_env: str  # its read token (the pod contract's name for its tokenSecretRef)
    missing: Reason  # the Failed reason when it does not exist


_SOURCES: dict[SourceKind, _Source] = {
    "model": _Source("spec.model.source", pod.MODEL_TOKEN_ENV, Reason.MODEL_NOT_FOUND),
    "dataset": _Source("spec.dataset.source", pod.DATASET_TOKEN_ENV, Reason.DATASET_NOT_FOUND),
    "vae": _Source("spec.model.vae.source", pod.MODEL_TOKEN_ENV, Reason.MODEL_NOT_FOUND),
}


def read_token(kind: SourceKind, env: Mapping[str, str] = os.environ) -> str | None:
    """The token that downloads the model or the dataset: the source's own read token, else the
    push token HF_TOKEN (as before sources had their own); None: anonymous.

    Pass it to every download explicitly (`token=`): given None, huggingface_hub sends HF_TOKEN
    by itself, and a source with a read token must never be sent the push token.
    """
    return env.get(_SOURCES[kind].token_env) or env.get(pod.HF_TOKEN_ENV) or None


class SourceNotFound(Exception):
    """A model or dataset source that does not exist; `reason` is the Failed reason and `field`
    the spec field that names the source."""

    def __init__(self, kind: SourceKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = _SOURCES[kind].missing
        self.field = _SOURCES[kind].field


def endpoint_in_use() -> str:
    """The endpoint huggingface_hub (and so transformers and datasets) downloads from."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def missing_local(job: FineTuneJob) -> SourceNotFound | None:
    """The first file:// source whose path does not exist, model first."""
    sources: list[tuple[SourceKind, str]] = [
        ("model", job.spec.model.source),
        ("dataset", job.spec.dataset.source),
    ]
    if job.spec.model.vae is not None:
        sources.append(("vae", job.spec.model.vae.source))
    for kind, source in sources:
        path = source.removeprefix("file://")
        if source.startswith("file://") and not os.path.exists(path):
            return SourceNotFound(kind, f"{path} does not exist")
    return None


def not_found(
    exc: BaseException, kind: SourceKind, repo: str, revision: str | None = None
) -> SourceNotFound | None:
    """`exc`, raised while loading `repo` from the Hub, as a SourceNotFound if it says the repo
    (or its revision) does not exist; None for anything else, such as a gated repo or a 503."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = endpoint_in_use()
    seen: BaseException | None = exc
    for _ in range(8):  # transformers wraps the Hub's error in an OSError of its own
        if seen is None:
            break
        if isinstance(seen, RevisionNotFoundError):
            return SourceNotFound(kind, f"{kind} {repo} has no revision {revision} at {endpoint}")
        if isinstance(seen, RepositoryNotFoundError) and not isinstance(seen, GatedRepoError):
            return SourceNotFound(kind, _missing(kind, repo, endpoint))
        if kind == "dataset" and isinstance(seen, DatasetNotFoundError):
            return SourceNotFound(kind, _missing(kind, repo, endpoint))
        seen = seen.__cause__ or seen.__context__
    return None


def _missing(kind: SourceKind, repo: str, endpoint: str) -> str:
    return (
        f"{kind} {repo} was not found at {endpoint}: check the name, and that the token (if "
        "any) may read it"
    )


@contextmanager
def downloading(
    kind: SourceKind,
    repo: str,
    revision: str | None = None,
    env: MutableMapping[str, str] = os.environ,
) -> Iterator[str | None]:
    """Download the model or dataset `repo` within: yields its read token (`read_token`), to pass
    to the loader as `token=`, and reports a source that does not exist as SourceNotFound.

    Meanwhile HF_TOKEN is that token too, restored on the way out: transformers makes some Hub
    calls without the token it was given (its tokenizer lists the repo's files through its own
    HfApi, which then sends HF_TOKEN), and those must not carry the push token to a source that
    has a read token of its own.
    """
    token = read_token(kind, env)
    push = env.get(pod.HF_TOKEN_ENV)
    if token is not None:
        env[pod.HF_TOKEN_ENV] = token
    try:
        with reported_missing(kind, repo, revision):
            yield token
    finally:
        if push is None:
            env.pop(pod.HF_TOKEN_ENV, None)
        else:
            env[pod.HF_TOKEN_ENV] = push


@contextmanager
def reported_missing(kind: SourceKind, repo: str, revision: str | None = None) -> Iterator[None]:
    """Re-raise a loading error that says `repo` does not exist as SourceNotFound."""
    try:
        yield
    except Exception as exc:
        missing = not_found(exc, kind, repo, revision)
        if missing is None:
            raise
        # `from None`: transformers' message points at huggingface.co whatever the endpoint.
        raise missing from None
