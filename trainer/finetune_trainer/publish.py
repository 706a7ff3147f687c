"""Push a fine-tuning result to a Hugging Face Hub, in one commit.

The push token comes only from the environment variable HF_TOKEN (set in the pod from the Secret
in `output.hub.tokenSecretRef`): never from an argument, the spec or a file, so that it cannot end
in the FineTuneJob, a command line or a log. It is handed to `HfApi` explicitly, and the base
model's card (for the card's license) is read with the model's own read token
(`sources.read_token`), so neither token is used for the other's work. Error messages that leave
this module are passed through `finetune_api.result.scrub`, the one token scrubber.

Where the commit lands follows the spec: main; `output.hub.branch`, created from main when
missing; or, with `output.hub.createPr`, a new pull request against main (its commit on
refs/pr/N). The result says which: the commit, its branch, or the pull request's ref and page.

huggingface_hub is imported inside functions: it reads HF_ENDPOINT and HF_HUB_DISABLE_XET when
first imported, and the endpoint here is passed to `HfApi` explicitly instead. Set
HF_HUB_DISABLE_XET=1 before huggingface_hub is first imported when the endpoint does not speak
Xet (a mirror or the test double); otherwise uploads try Xet.

Failures fall in three classes (`hub_retry.failure_class`). Transient ones (429, 408, 409, 5xx, a
connection error or timeout) are retried here, the whole push again, with the Hub backoff of
hub_retry.py: huggingface_hub already retries its preupload and LFS calls (`http_backoff`) but
neither the repo creation nor the commit. Permanent ones (401, 403, a missing namespace, a repo id
the client refuses: any other 4xx) raise at once, with `PushError.permanent` set, so the job ends
without another attempt. Anything else raises at once as retryable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.pod import HF_TOKEN_ENV
from finetune_api.result import Sample, scrub
from finetune_api.v1alpha1 import DEFAULT_BRANCH, FineTuneJob, HubOutput
from finetune_trainer.fetch import NO_COMMITS, Commits, revision_to_load
from finetune_trainer.hub_repo import VisibilityError, ensure_branch, ensure_repo
from finetune_trainer.hub_retry import HUB_BACKOFF, Backoff, failure_class, with_backoff
from finetune_trainer.model_card import LICENSE_KEYS, render_model_card, source_id
from finetune_trainer.sources import read_token

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

__all__ = [
    "DEFAULT_ENDPOINT",
    "PushError",
    "PushResult",
    "base_license",
    "hub_endpoint",
    "push_to_hub",
]

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class PushResult:
    repo: str
    revision: str  # the commit sha the push made
    url: str  # {endpoint}/{repo}/commit/{sha}
    # What the push changed besides the commit, for the result's message: e.g. that a public
    # repo was made private. Empty when nothing.
    note: str = ""
    # The branch the commit is on; None when it is on a pull request's ref.
    branch: str | None = DEFAULT_BRANCH
    # The pull request the push opened (output.hub.createPr): refs/pr/N, and its page.
    pr_revision: str | None = None
    pr_url: str | None = None


class PushError(RuntimeError):
    """The push failed; the message is already redacted. `permanent`: the Hub refused it
    (credentials, permissions, namespace or name), so another attempt cannot succeed."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def hub_endpoint(job: FineTuneJob) -> str:
    """spec.output.hub.endpoint, else HF_ENDPOINT, else huggingface.co; no trailing slash."""
    hub = job.spec.output.hub
    endpoint = (hub.endpoint if hub else None) or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return endpoint.rstrip("/")


def push_to_hub(
    job: FineTuneJob,
    artifact_dir: Path,
    scores: Mapping[str, Mapping[str, float | None]],
    artifact: str,
    backoff: Backoff = HUB_BACKOFF,
    samples: Sequence[Sample] = (),
    commits: Commits = NO_COMMITS,
) -> PushResult:
    """Write the model card into artifact_dir and push the folder to spec.output.hub.repo.

    Creates the repo if needed (private as the spec says), makes an existing public repo
    private when the spec says private (hub_repo.ensure_repo), and uploads the whole folder as
    one commit, so that the returned revision names exactly this result. The card's license is
    output.hub.license, else the base model's (`base_license`). Transient failures are retried
    per `backoff`. Raises PushError, with the token redacted, on any failure that is left.
    """
    hub = job.spec.output.hub
    if hub is None:
        raise PushError("spec.output.hub is not set: there is nowhere to push")
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise PushError(f"artifact folder {artifact_dir} does not exist")
    endpoint = hub_endpoint(job)
    # The push token only, given explicitly: the read tokens are for the sources.
    token = os.environ.get(HF_TOKEN_ENV) or None
    if token is None:
        log.warning("HF_TOKEN is not set: pushing to %s anonymously", endpoint)
    target = f"{endpoint}/{hub.repo}"
    from huggingface_hub import HfApi, constants

    # huggingface_hub read HF_HUB_DISABLE_XET when first imported, possibly before the
    # caller set it; honour it now too, or uploads to a non-Xet endpoint fail.
    if os.environ.get("HF_HUB_DISABLE_XET", "").upper() in ("1", "ON", "YES", "TRUE"):
        constants.HF_HUB_DISABLE_XET = True
    api = HfApi(endpoint=endpoint, token=token)
    # The base model's card is the model's to read: with its read token, not the push token.
    reader = HfApi(endpoint=endpoint, token=read_token("model"))
    inherited = None if hub.license else base_license(job, reader)
    try:
        (artifact_dir / "README.md").write_text(
            render_model_card(job, scores, artifact, inherited, artifact_dir, samples, commits),
            encoding="utf-8",
        )
    except Exception as exc:
        raise PushError(scrub(f"push to {target} failed: {type(exc).__name__}: {exc}")) from None
    message = (
        f"finetune-operator: {artifact} from FineTuneJob "
        f"{job.metadata.namespace}/{job.metadata.name}"
    )

    notes: list[str] = []

    def push() -> CommitInfo:
        note = ensure_repo(api, hub.repo, hub.private, target)
        if note:
            notes.append(note)
        if hub.branch and hub.branch != DEFAULT_BRANCH:
            ensure_branch(api, hub.repo, hub.branch)
        # With create_pr the Hub opens a pull request against main and commits to its ref.
        return api.upload_folder(
            repo_id=hub.repo,
            folder_path=artifact_dir,
            repo_type="model",
            commit_message=message,
            revision=hub.branch,
            create_pr=hub.create_pr,
        )

    try:
        info = with_backoff(push, f"push to {target}", backoff)
    except VisibilityError as exc:
        raise PushError(str(exc), permanent=True) from None
    except Exception as exc:
        kind = failure_class(exc)
        # Scrubbed, and raised `from None`: the original exception (and its traceback text)
        # could quote the request.
        what = scrub(f"{type(exc).__name__}: {exc}")
        if kind == "permanent":
            raise PushError(
                f"push to {target} was refused, and retrying cannot help (check that the "
                f"token of output.hub.tokenSecretRef may write to {hub.repo}): {what}",
                permanent=True,
            ) from None
        tries = f" after {backoff.retries + 1} attempts" if kind == "transient" else ""
        raise PushError(f"push to {target} failed{tries}: {what}") from None
    return _pushed(hub, endpoint, artifact, info, notes)


def _pushed(
    hub: HubOutput, endpoint: str, artifact: str, info: CommitInfo, notes: list[str]
) -> PushResult:
    """What the push made, as the Hub answered: the commit, and the pull request it opened."""
    revision = info.oid
    url = f"{endpoint}/{hub.repo}/commit/{revision}"
    if info.pr_revision is not None:
        log.info("pushed %s to %s: pull request %s", artifact, hub.repo, info.pr_url)
        return PushResult(
            repo=hub.repo,
            revision=revision,
            url=url,
            note="; ".join(notes),
            branch=None,
            pr_revision=info.pr_revision,
            pr_url=info.pr_url,
        )
    branch = hub.branch or DEFAULT_BRANCH
    if hub.create_pr:
        # huggingface_hub skips a commit that changes no file, and then opens no pull request.
        notes.append(f"{branch} already holds these files: no pull request was opened")
        log.warning("%s", notes[-1])
    log.info("pushed %s to %s at %s on %s", artifact, hub.repo, revision, branch)
    return PushResult(
        repo=hub.repo, revision=revision, url=url, note="; ".join(notes), branch=branch
    )


def base_license(job: FineTuneJob, api: HfApi) -> dict[str, str]:
    """The base model's license metadata (model_card.LICENSE_KEYS), as transformers' Trainer
    infers a card's license: from the base's Hub card (hf://, at the pinned revision, through
    `api`), or from the README.md in a file:// base's folder. {} when it has none or it cannot
    be read; that never fails a push."""
    model = job.spec.model
    base = source_id(model.source)
    meta: dict[str, Any] = {}
    try:
        if base is None:
            readme = Path(model.source.removeprefix("file://")) / "README.md"
            if readme.is_file():
                from huggingface_hub import metadata_load

                meta = metadata_load(readme) or {}
        else:
            # At the commit the model was loaded at (fetch.py), when this process fetched it.
            revision = revision_to_load("model", model.source, model.revision)
            info = api.model_info(base, revision=revision)
            meta = info.card_data.to_dict() if info.card_data is not None else {}
            if not meta.get("license"):  # the Hub also lists it as a tag
                tags = [t for t in info.tags or [] if t.startswith("license:")]
                meta = {"license": tags[0].removeprefix("license:")} if tags else {}
    except Exception as exc:
        log.warning(
            "the model card gets no license: the base model's could not be read (%s); set "
            "output.hub.license to name one",
            scrub(f"{type(exc).__name__}: {exc}")[:300],
        )
        return {}
    return {k: v for k in LICENSE_KEYS if isinstance(v := meta.get(k), str) and v}
