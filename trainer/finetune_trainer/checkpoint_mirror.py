"""Checkpoints that outlive the gang on the Hub, for a multi-node gang with no shared volume.

The operator sets FINETUNE_CHECKPOINT_HUB_BRANCH (finetune_api.pod.CHECKPOINT_HUB_BRANCH_ENV) for
a gang with output.hub and no claim that every pod can mount. Rank 0 then
- after each complete local checkpoint, uploads it to `last-checkpoint/` on that branch of
  output.hub.repo (the folder transformers' `hub_strategy="checkpoint"` pushes), replacing the
  previous one in one commit, so the branch only ever holds a whole checkpoint;
- at start, when the local checkpoint folder holds none (a new gang on new pods), downloads
  `last-checkpoint/` from the branch, checks it is complete and of this run, and adopts it into
  the local folder, from where it resumes as from its own.

An upload runs synchronously, so a fault costs at most one checkpoint interval. A failed upload
is retried as Hub calls are (hub_retry.py); if it still fails, training goes on with a warning
and `finetune_checkpoint_mirror_stale` at 1: the branch holds an older checkpoint. A missing repo
or branch at start means a fresh start; a Hub that cannot be read fails the attempt (retryable)
rather than start afresh and then overwrite the branch's checkpoint with an earlier one.

The token comes from HF_TOKEN only, and every message passes through `scrub`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from finetune_api import FieldError, FineTuneJob, ManifestError
from finetune_api.pod import CHECKPOINT_HUB_BRANCH_ENV, HF_TOKEN_ENV
from finetune_api.result import scrub
from finetune_api.v1alpha1 import CheckpointStorage
from finetune_trainer import checkpoint
from finetune_trainer.hub_repo import ensure_repo
from finetune_trainer.hub_retry import HUB_BACKOFF, Backoff, with_backoff
from finetune_trainer.publish import hub_endpoint

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from finetune_trainer.telemetry import TrainerMetrics

__all__ = ["MIRROR_FOLDER", "RUN_FILE", "CheckpointMirror", "MirrorError"]

log = logging.getLogger(__name__)

MIRROR_FOLDER = "last-checkpoint"
# Written beside the checkpoint: which run it belongs to (the local folder's name, job name plus
# a digest of what shapes training), so that a changed spec does not resume someone else's run.
RUN_FILE = "finetune-run.json"


class MirrorError(RuntimeError):
    """The branch could not be read; the message is already scrubbed."""


class CheckpointMirror:
    """Rank 0's link to the checkpoint branch of one run."""

    def __init__(
        self,
        *,
        repo: str,
        branch: str,
        endpoint: str,
        private: bool,
        run: str,
        job: str,
        telemetry: TrainerMetrics | None = None,
        backoff: Backoff = HUB_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.repo, self.branch, self.endpoint, self.private = repo, branch, endpoint, private
        self.run, self.job, self.telemetry = run, job, telemetry
        self.backoff, self.sleep = backoff, sleep
        # The step the branch is known to hold; None until this process mirrored or restored one.
        self.mirrored_step: int | None = None
        self._branch_ready = False

    @classmethod
    def from_env(
        cls,
        job: FineTuneJob,
        run: str,
        telemetry: TrainerMetrics | None = None,
        env: Mapping[str, str] = os.environ,
    ) -> CheckpointMirror | None:
        """The mirror the env asks for, or None when FINETUNE_CHECKPOINT_HUB_BRANCH is unset.

        `run` names this run's checkpoints (job_folder.checkpoint_root's folder name). A branch name
        the schema would refuse, or the variable without spec.output.hub, is a ManifestError.
        """
        branch = env.get(CHECKPOINT_HUB_BRANCH_ENV, "").strip()
        if not branch:
            return None
        hub = job.spec.output.hub
        if hub is None:
            raise ManifestError(
                [FieldError(CHECKPOINT_HUB_BRANCH_ENV, "is set, but spec.output.hub is not")]
            )
        try:  # the schema's own rule for output.checkpoints.hubBranch
            CheckpointStorage(hub_branch=branch)
        except ValidationError:
            raise ManifestError(
                [FieldError(CHECKPOINT_HUB_BRANCH_ENV, f"{branch!r} is not a valid branch name")]
            ) from None
        return cls(
            repo=hub.repo,
            branch=branch,
            endpoint=hub_endpoint(job),
            private=hub.private,
            run=run,
            job=f"{job.metadata.namespace}/{job.metadata.name}",
            telemetry=telemetry,
        )

    @property
    def where(self) -> str:
        return f"{self.endpoint}/{self.repo} (branch {self.branch})"

    def _api(self) -> HfApi:
        from huggingface_hub import HfApi, constants

        # As in publish.py: honour HF_HUB_DISABLE_XET even if it was set after the import.
        if os.environ.get("HF_HUB_DISABLE_XET", "").upper() in ("1", "ON", "YES", "TRUE"):
            constants.HF_HUB_DISABLE_XET = True
        return HfApi(endpoint=self.endpoint, token=os.environ.get(HF_TOKEN_ENV) or None)

    # ---- upload -------------------------------------------------------------------------------

    def upload(self, folder: Path) -> bool:
        """Mirror the complete checkpoint `folder`; True if the branch now holds it.

        Never raises: a checkpoint that could not be mirrored leaves the branch one behind,
        which is logged and exported, and training goes on.
        """
        started = time.perf_counter()
        try:
            step = checkpoint.read_state(folder).step
            with_backoff(
                lambda: self._commit(folder, step),
                f"mirroring the checkpoint at step {step} to {self.where}",
                self.backoff,
                self.sleep,
            )
        except Exception as exc:
            self._branch_ready = False  # the branch may have gone: make sure of it next time
            self._record(stale=True)
            held = "no checkpoint" if self.mirrored_step is None else f"step {self.mirrored_step}"
            log.warning(
                "checkpoint mirror stale: %s was not mirrored to %s: %s; the branch holds %s, "
                "which a gang on new pods would resume from",
                folder.name,
                self.where,
                scrub(f"{type(exc).__name__}: {exc}"),
                held,
            )
            return False
        self.mirrored_step = step
        self._record(stale=False)
        log.info(
            "mirrored the checkpoint at step %d to %s in %.1f s",
            step,
            self.where,
            time.perf_counter() - started,
        )
        return True

    def _commit(self, folder: Path, step: int) -> None:
        """One commit that makes `last-checkpoint/` on the branch exactly `folder`."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        api = self._api()
        if not self._branch_ready:
            # Private as the spec says, even when the repo exists (hub_repo.ensure_repo).
            ensure_repo(api, self.repo, self.private, f"{self.endpoint}/{self.repo}")
            api.create_branch(self.repo, branch=self.branch, exist_ok=True)
            self._branch_ready = True
        adds = [
            CommitOperationAdd(
                path_in_repo=f"{MIRROR_FOLDER}/{path.relative_to(folder).as_posix()}",
                path_or_fileobj=str(path),
            )
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        run = json.dumps({"run": self.run, "step": step, "job": self.job}).encode()
        adds.append(CommitOperationAdd(f"{MIRROR_FOLDER}/{RUN_FILE}", run))
        keep = {op.path_in_repo for op in adds}
        stale = [
            CommitOperationDelete(path_in_repo=name)
            for name in api.list_repo_files(self.repo, revision=self.branch)
            if name.startswith(f"{MIRROR_FOLDER}/") and name not in keep
        ]
        api.create_commit(
            self.repo,
            operations=[*stale, *adds],
            commit_message=f"finetune-operator: checkpoint at step {step} of FineTuneJob "
            f"{self.job}",
            revision=self.branch,
        )

    def _record(self, stale: bool) -> None:
        if self.telemetry is not None:
            self.telemetry.record_mirror(stale)

    # ---- restore ------------------------------------------------------------------------------

    def restore(self, root: Path) -> Path | None:
        """Adopt the branch's checkpoint into `root` and return its local folder; None when the
        repo, the branch or a checkpoint of this run is not there (a fresh start).

        Raises MirrorError when the Hub cannot be read even after retries.
        """
        try:
            return with_backoff(
                lambda: self._download(root),
                f"reading the mirrored checkpoint from {self.where}",
                self.backoff,
                self.sleep,
            )
        except Exception as exc:
            raise MirrorError(
                scrub(
                    f"cannot read the mirrored checkpoint from {self.where}: "
                    f"{type(exc).__name__}: {exc}"
                )
            ) from None

    def _download(self, root: Path) -> Path | None:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        api = self._api()
        try:
            info = api.repo_info(self.repo, revision=self.branch)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            log.info("no mirrored checkpoint: %s does not exist yet", self.where)
            return None
        names = {s.rfilename for s in info.siblings or []}
        wanted = {checkpoint.COMPLETE_MARKER, checkpoint.STATE_FILE, RUN_FILE}
        if not {f"{MIRROR_FOLDER}/{name}" for name in wanted} <= names:
            log.info("no mirrored checkpoint: %s holds no complete %s/", self.where, MIRROR_FOLDER)
            return None
        scratch = checkpoint.scratch(root)
        try:
            # At the commit just read, so a mirror committed meanwhile cannot mix in.
            api.snapshot_download(
                self.repo,
                revision=info.sha,
                allow_patterns=[f"{MIRROR_FOLDER}/*"],
                local_dir=scratch,
            )
            folder = scratch / MIRROR_FOLDER
            owner = _read_json(folder / RUN_FILE).get("run")
            if owner != self.run:
                log.warning(
                    "not resuming from the checkpoint on %s: it is of run %s, this is %s (the "
                    "job or its training spec changed); starting afresh",
                    self.where,
                    owner,
                    self.run,
                )
                return None
            try:
                adopted = checkpoint.adopt(root, folder)
            except ValueError as exc:  # a broken upload: retrying will not mend it
                log.warning("not resuming from the checkpoint on %s: %s", self.where, exc)
                return None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.mirrored_step = checkpoint.read_state(adopted).step
        self._branch_ready = True
        log.info(
            "restored the checkpoint at step %d from %s (commit %s)",
            self.mirrored_step,
            self.where,
            info.sha,
        )
        return adopted


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
