"""One download per job when the pods share no volume: rank 0's copy of each source, sent over
the gang's network to every pod whose hub cache is its own.

A multi-node gang without a ReadWriteMany claim has its hub cache in each pod's emptyDir. Rank 0
downloads the model and the dataset (`fetch.download`); the first rank of every pod that then
finds no complete copy in its own cache receives rank 0's files by broadcast, writes them into
the same snapshot folder the Hub download would have made, and marks it complete. The pod's
other ranks wait at a barrier and read that copy. So the Hub serves each file once per job
(once per attempt, where nothing durable keeps the cache), not once per pod. Under fsdp the
copy leaves out the model's weights: only rank 0 reads them (fetch.reads_base_weights), and
the other pods need its config and tokenizer alone, which for an 8B model is some megabytes
instead of 16 GB per pod.

The files travel on a gloo group of their own, on CPU whatever the training backend (NCCL
moves GPU tensors only), and only between rank 0 and the receiving ranks. Its timeout is long:
every other rank waits in it while rank 0 downloads, which for a large model can take longer
than torch's 30-minute default. A download that fails ends rank 0, and gloo then fails the
waiting ranks at once (their peer is gone), so the long timeout does not hold up a failure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist

from finetune_trainer.fetch import Alone, Peers, Snapshot

log = logging.getLogger(__name__)

# How long the other ranks wait for rank 0's download and copy.
FETCH_TIMEOUT = timedelta(hours=6)
# The bytes sent per broadcast: large enough that the per-call cost vanishes, small enough
# that a rank's buffer stays modest.
CHUNK_BYTES = 64 << 20

# (path relative to the snapshot folder, size in bytes) of every file of one snapshot.
Listing = list[tuple[str, int]]


class Gang:
    """The ranks of a job of more than one process (`fetch.Peers`), over a gloo group of their
    own, formed on first use: every rank uses it at the same point (a job with only file://
    sources, or offline, never does)."""

    def __init__(self, is_local_main: bool, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self._is_local_main = is_local_main
        self._chunk = chunk_bytes

    @cached_property
    def _group(self) -> Any:
        return dist.new_group(backend="gloo", timeout=FETCH_TIMEOUT)

    def broadcast(self, value: Any) -> Any:
        return _broadcast_object(value, self._group)

    def share(self, snapshots: list[Snapshot]) -> None:
        lacking = self._is_local_main and not all(s.is_complete() for s in snapshots)
        flags: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(flags, lacking, group=self._group)
        receivers = [rank for rank, lacks in enumerate(flags) if lacks]
        if receivers and (self.is_main or self.rank in receivers):
            # Only the members form it (local synchronization): the others go to the barrier.
            members = dist.new_group(
                [0, *receivers],
                backend="gloo",
                timeout=FETCH_TIMEOUT,
                use_local_synchronization=True,
            )
            try:
                self._copy(snapshots, members, receivers)
            finally:
                dist.destroy_process_group(members)
        # A pod's other ranks read its copy only once it is whole.
        dist.barrier(group=self._group)

    def close(self) -> None:
        if "_group" in self.__dict__:  # formed
            dist.destroy_process_group(self._group)

    def _copy(self, snapshots: list[Snapshot], group: Any, receivers: list[int]) -> None:
        """Rank 0 sends each snapshot's files; each receiver writes them and marks it complete."""
        start = time.monotonic()
        listings = [_listing(s) for s in snapshots] if self.is_main else []
        listings = _broadcast_object(listings, group)
        buffer = torch.empty(self._chunk, dtype=torch.uint8)
        view = buffer.numpy()
        total = 0
        for snap, listing in zip(snapshots, listings, strict=True):
            for relative, size in listing:
                path = snap.folder / relative
                if self.is_main:
                    with path.open("rb") as source:
                        for n in self._chunks(size):
                            if source.readinto(view[:n]) != n:
                                raise OSError(f"{path} shrank while it was being sent")
                            dist.broadcast(buffer[:n], src=0, group=group)
                else:
                    with snap.filling(), _written(path) as target:
                        for n in self._chunks(size):
                            dist.broadcast(buffer[:n], src=0, group=group)
                            target.write(view[:n])
                total += size
            if not self.is_main:
                snap.mark_complete()
        took, mib = time.monotonic() - start, total / (1 << 20)
        if self.is_main:
            log.info("sent %.1f MiB of sources to ranks %s in %.1f s", mib, receivers, took)
        else:
            log.info("received %.1f MiB of sources from rank 0 in %.1f s", mib, took)

    def _chunks(self, size: int) -> list[int]:
        """The sizes of the broadcasts that carry a file of `size` bytes."""
        return [min(self._chunk, size - offset) for offset in range(0, size, self._chunk)]


@contextmanager
def peers(is_local_main: bool) -> Iterator[Peers]:
    """The job's ranks as fetching needs them, a gang's or a single process's, for the length
    of the block."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield Alone()
        return
    gang = Gang(is_local_main)
    try:
        yield gang
    finally:
        gang.close()


def _listing(snap: Snapshot) -> Listing:
    """Every file of a snapshot (`Snapshot.holds`: under fsdp, not the weights) in its folder,
    whose entries are links into the cache's blobs (the sizes are of what they point at), in a
    stable order."""
    files = sorted(p for p in snap.folder.rglob("*") if p.is_file())
    named = [(p, p.relative_to(snap.folder).as_posix()) for p in files]
    return [(relative, p.stat().st_size) for p, relative in named if snap.holds(relative)]


def _broadcast_object(value: Any, group: Any) -> Any:
    """Rank 0's `value`, on every rank of `group`."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


@contextmanager
def _written(path: Path) -> Iterator[BinaryIO]:
    """A file to write `path` through, renamed into place only once it is whole. A copy cut
    short removes its part: the pod's emptyDir outlives the rank when the gang restarts in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.incomplete")
    try:
        with tmp.open("wb") as target:
            yield target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
