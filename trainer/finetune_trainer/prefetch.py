"""Rank 0's sources, fetched while its pod imports the trainer.

A pod imports torch, transformers and peft (seconds of CPU) before its ranks can form the gang,
and only then did rank 0 resolve and download the model and the dataset. Now `finetune train` on
the pod of rank 0 first forks a prefetch process (`Prefetch.start`), before it imports anything
of torch, so the fork is cheap and safe (one thread, no CUDA). That process does rank 0's part of
`fetch.fetch_sources` early: it resolves the revisions and keeps them in the job's checkpoint
folder (`fetch.kept_or_resolved`), says so through a pipe, and downloads each snapshot into the
hub cache under the snapshot's lock (`fetch.download`).

The launcher forks the ranks only once the revisions are resolved, so rank 0 finds them kept and
does not ask the Hub again; its own download waits on the lock for the prefetch's and finds the
snapshot whole. So the download overlaps the import (and, on a cluster, the other pods'
scheduling and image pulls), and the Hub still serves one lookup of each repo and each file
once per job.

Best effort: what fails here (the Hub unreachable, a source that does not exist) rank 0 meets
again when it fetches, and reports as the job's result, so the prefetch only logs it. Nothing is
prefetched where rank 0 fetches nothing: only file:// sources, the Hub offline, or a final
artifact that an earlier attempt kept and that is pushed without loading the sources.
"""

from __future__ import annotations

import functools
import logging
import os

from finetune_api import FineTuneJob
from finetune_api.result import scrub
from finetune_trainer import fetch
from finetune_trainer.env import ensure_writable_hf_home, setup_logging
from finetune_trainer.forked import Forked
from finetune_trainer.job_folder import checkpoint_root, final_kept

log = logging.getLogger(__name__)


def wanted(job: FineTuneJob, node_rank: int) -> bool:
    """Whether the pod of `node_rank` prefetches: it holds rank 0, which will fetch."""
    return node_rank == 0 and fetch.fetches(job.spec) and not final_kept(checkpoint_root(job))


def _prefetch(job: FineTuneJob, launchers_fd: int, resolved_fd: int) -> int:
    """In the prefetch process: resolve and keep the revisions, close `resolved_fd` to say so,
    then download. The Hub environment is the launcher's (configure_hub_env ran before)."""
    os.close(launchers_fd)  # the launcher's end of the pipe: its read ends when this one closes
    ensure_writable_hf_home()  # as a rank does, so that both use the same cache
    setup_logging("prefetch")
    try:
        commits = fetch.kept_or_resolved(job.spec, checkpoint_root(job))
        os.close(resolved_fd)
        for snap in fetch.snapshots(job.spec, commits):
            fetch.download(snap)
    except Exception as exc:
        log.warning("left to rank 0, which reports it: %s", scrub(f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


class Prefetch:
    """The prefetch process of `finetune train`, or none where it is not wanted."""

    def __init__(self, proc: Forked | None = None, resolved_fd: int | None = None) -> None:
        self._proc, self._resolved_fd = proc, resolved_fd

    @classmethod
    def start(cls, job: FineTuneJob, node_rank: int) -> Prefetch:
        """Fork it on the pod of rank 0, where rank 0 will fetch. Call before torch is imported."""
        if not wanted(job, node_rank):
            return cls()
        read, write = os.pipe()
        proc = Forked(functools.partial(_prefetch, job, read, write))
        os.close(write)
        return cls(proc, read)

    def wait_resolved(self) -> None:
        """Until it has resolved and kept the revisions (it closes its end of the pipe), or
        ended without."""
        if self._resolved_fd is not None:
            os.read(self._resolved_fd, 1)  # b"": the prefetch's end closed
            self._close_pipe()

    def stop(self) -> None:
        """End it if it still runs (the ranks ended without needing its download), and reap it."""
        self._close_pipe()  # not waited for where the launcher failed first
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def _close_pipe(self) -> None:
        if self._resolved_fd is not None:
            os.close(self._resolved_fd)
            self._resolved_fd = None
