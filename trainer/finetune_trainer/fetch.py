"""One download per job: each hf:// source resolved to a commit once, and fetched once.

Rank 0 resolves the model's and the dataset's revision (a branch, tag or commit; unset: main) to
a commit sha and broadcasts it, so every rank loads exactly that commit: a branch that moves while
the gang starts cannot give ranks different weights or rows. Rank 0 keeps the resolution in the
job's checkpoint folder (`sources.json`), so a later attempt on a durable store loads the same
commits without asking the Hub again.

The files go into huggingface_hub's cache (HF_HUB_CACHE), keyed by repo and commit; no token is in
any path. The operator points that cache at the checkpoint volume when the job has one
(pod.SOURCE_CACHE_DIR), so every pod and attempt reads one copy; otherwise it is the pod's own
(HF_HOME/hub). Rank 0 downloads each snapshot, under the snapshot's file lock, and then marks it
complete. Every pod whose cache lacks the mark (its cache is its own) then gets rank 0's copy over
the gang's network (`finetune_trainer.spread`). Loading then reads the cache only
(`local_files_only`; a dataset from its snapshot folder): no Hub request per rank or per pod.

Nothing here imports torch; huggingface_hub is imported where it is used.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from finetune_api import ManifestError
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.job_folder import (
    checkpoint_volume,
    free_bytes,
    no_space,
    quantity,
    quantity_bytes,
)
from finetune_trainer.sources import SourceKind, SourceNotFound, downloading

log = logging.getLogger(__name__)
# In the job's checkpoint folder: the commits its first attempt resolved.
RESOLVED_FILE = "sources.json"
# Under the hub cache: the locks and completion marks of the snapshots fetched here.
_MARKS = ".finetune-fetched"


@dataclass(frozen=True)
class Commits:
    """The commit each hf:// source resolved to; None for a file:// source (it has none)."""

    model: str | None = None
    dataset: str | None = None
    vae: str | None = None  # text-to-image's model.vae

    def of(self, kind: SourceKind) -> str | None:
        commit: str | None = getattr(self, kind)
        return commit


# Model files that transformers, sentence-transformers and diffusers never load from a repo that
# also has their safetensors: other frameworks' formats, and Meta's original checkpoint (a
# second copy of Llama's weights, 16 GB for 8B). The loaders read safetensors when a folder has
# them, so a folder's `.bin` weights and its variants (diffusers' `.fp16.`) are skipped too.
_OTHER_FORMATS = re.compile(
    r"(^|/)(original|onnx|openvino|coreml)/"
    r"|\.(pth|h5|msgpack|ot|onnx|onnx_data|gguf|tflite|mlmodel)$"
    r"|(^|/)(flax|tf|rust)_model[^/]*$"
)
_VARIANT = re.compile(r"\.(fp16|bf16|ema|non_ema)([.-]|$)")
# A diffusers pipeline repo has this at its root; it names the folders of the pipeline's parts.
PIPELINE_INDEX = "model_index.json"
_WEIGHTS = re.compile(r"\.(safetensors|bin|ckpt|pt|pth)$")


def pipeline_parts(model_index: dict[str, Any]) -> set[str]:
    """The part folders a model_index.json names (unet, vae, text_encoder...), as
    `DiffusionPipeline.download` reads them: every key whose value is [library, class]."""
    return {k for k, v in model_index.items() if isinstance(v, list) and not k.startswith("_")}


def model_files_to_fetch(files: list[str], parts: set[str] | None = None) -> list[str]:
    """The files of a model repo that loading it reads (or may read): everything but other
    formats' weights, and a folder's `.bin` weights and variant files where that folder has
    plain safetensors.

    In a diffusers pipeline repo (`parts`: the folders its model_index.json names), only those
    folders and the root's files other than weights: `from_pretrained` reads nothing else, and a
    pipeline repo's root and extra folders often hold the same weights again, as single-file
    checkpoints (Stable Diffusion 1.5's root has four, 4 to 7.7 GB each; SDXL base's two of
    6.9 GB, plus a second VAE folder)."""
    if parts is not None:
        files = [
            f
            for f in files
            if f.split("/", 1)[0] in parts or ("/" not in f and not _WEIGHTS.search(f))
        ]
    with_safetensors = {
        posixpath.dirname(f)
        for f in files
        if f.endswith(".safetensors") and not _VARIANT.search(posixpath.basename(f))
    }

    def shadowed(f: str) -> bool:
        if posixpath.dirname(f) not in with_safetensors:
            return False
        name = posixpath.basename(f)
        return name.endswith(".bin") or (
            name.endswith(".safetensors") and bool(_VARIANT.search(name))
        )

    return [f for f in files if not _OTHER_FORMATS.search(f) and not shadowed(f)]


# No commits: file:// sources, or a Hub that is offline.
NO_COMMITS = Commits()


# What this process fetched: kind -> (repo id, commit, snapshot folder). Set once per rank by
# `fetch_sources`; the loaders (modeling, data) read it through `pinned`.
_fetched: dict[SourceKind, tuple[str, str, Path]] = {}


def hub_repo(source: str) -> str | None:
    """The repo id of an hf:// source; None for file://."""
    return source.removeprefix("hf://") if source.startswith("hf://") else None


def pinned(kind: SourceKind, source: str) -> tuple[str, Path] | None:
    """(commit, snapshot folder) of a source this process fetched; None if it did not."""
    entry = _fetched.get(kind)
    if entry is None or entry[0] != hub_repo(source):
        return None
    return entry[1], entry[2]


def revision_to_load(kind: SourceKind, source: str, revision: str | None) -> str | None:
    """The revision to load a source at: the fetched commit, else the spec's revision (hf://
    only; a file:// source has none)."""
    if hub_repo(source) is None:
        return None
    found = pinned(kind, source)
    return found[0] if found is not None else revision


def hub_sources(spec: FineTuneJobSpec) -> dict[SourceKind, tuple[str, str | None]]:
    """kind -> (repo id, revision asked for) of the spec's hf:// sources."""
    out: dict[SourceKind, tuple[str, str | None]] = {}
    sections: list[tuple[SourceKind, Any]] = [("model", spec.model), ("dataset", spec.dataset)]
    if spec.model.vae is not None:
        sections.append(("vae", spec.model.vae))
    for kind, section in sections:
        repo = hub_repo(section.source)
        if repo is not None:
            out[kind] = (repo, section.revision)
    return out


def fetches(spec: FineTuneJobSpec) -> bool:
    """Whether the job fetches from the Hub: it has an hf:// source, and the Hub is not offline
    (HF_HUB_OFFLINE: the sources load from the cache as they are)."""
    from huggingface_hub import constants

    return bool(hub_sources(spec)) and not constants.HF_HUB_OFFLINE


def resolve(spec: FineTuneJobSpec) -> Commits:
    """Ask the Hub which commit each hf:// source's revision names (rank 0, once per job). A
    repo or revision that does not exist raises SourceNotFound; sources larger than the hub
    cache can hold, ManifestError (`_check_room`)."""
    from huggingface_hub import HfApi

    found: dict[str, str] = {}
    sizes: dict[SourceKind, int] = {}
    for kind, (repo, revision) in hub_sources(spec).items():
        with downloading(kind, repo, revision) as token:
            api = HfApi(token=token)
            info: Any = (api.dataset_info if kind == "dataset" else api.model_info)(
                repo, revision=revision, token=token, files_metadata=True
            )
        found[kind] = info.sha
        sizes[kind] = _fetched_bytes(kind, info.siblings or [])
        log.info("%s %s at %s is commit %s", kind, repo, revision or "main", info.sha)
    commits = Commits(**found)
    _check_room(spec, commits, sizes)
    return commits


def _fetched_bytes(kind: SourceKind, siblings: list[Any]) -> int:
    """What downloading a source at a commit fetches: a model's files that loading it reads, a
    dataset's every file."""
    size = {s.rfilename: s.size or 0 for s in siblings}
    files = list(size) if kind == "dataset" else model_files_to_fetch(list(size))
    return sum(size[f] for f in files)


def _check_room(spec: FineTuneJobSpec, commits: Commits, sizes: dict[SourceKind, int]) -> None:
    """Refuse, before downloading, sources that cannot fit the hub cache: on a claim, its free
    space; in a pod's /tmp, template.cacheSize, past which the kubelet evicts the pod. A lower
    bound (the datasets cache and the artifact come later), so it refuses no cache that would
    do."""
    todo = [(s, sizes[s.kind]) for s in snapshots(spec, commits) if not s.is_complete()]
    need = sum(size for _, size in todo)
    cache = _hub_cache()
    on_claim = cache.is_relative_to(checkpoint_volume())
    if on_claim:
        room = free_bytes(cache)
        said = f"{quantity(room)} is free there"
    else:
        room = quantity_bytes(spec.template.cache_size)
        said = f"template.cacheSize is {spec.template.cache_size}"
    if need > room:
        what = " and ".join(f"the {s.kind} {s.repo} ({quantity(size)})" for s, size in todo)
        raise no_space(what, cache, f" than they take, {quantity(need)} ({said})")


def kept_or_resolved(spec: FineTuneJobSpec, root: Path) -> Commits:
    """Rank 0: the commits an earlier attempt resolved and kept in `root`, when they are for the
    same sources; else resolved now and kept there for the next attempt."""
    asked = hub_sources(spec)
    kept = _read_kept(root / RESOLVED_FILE)
    if kept is not None and kept.get("repos") == {k: r for k, (r, _) in asked.items()}:
        commits = Commits(**kept["commits"])
        # Kept by an earlier attempt, or by this attempt's prefetch (finetune_trainer.prefetch).
        log.info("loading the commits resolved before: %s", commits)
        return commits
    commits = resolve(spec)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{RESOLVED_FILE}.{os.getpid()}"
        repos = {k: r for k, (r, _) in asked.items()}
        tmp.write_text(json.dumps({"repos": repos, "commits": asdict(commits)}))
        os.replace(tmp, root / RESOLVED_FILE)
    except OSError as exc:  # a full or read-only store: the next attempt resolves again
        log.warning("could not keep the resolved commits in %s: %s", root, exc)
    return commits


def _read_kept(path: Path) -> dict[str, Any] | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    commits = kept.get("commits") if isinstance(kept, dict) else None
    if not isinstance(commits, dict) or set(commits) - {f.name for f in fields(Commits)}:
        return None
    if not all(v is None or isinstance(v, str) for v in commits.values()):
        return None
    return kept


def reads_base_weights(spec: FineTuneJobSpec, rank_0: bool) -> bool:
    """Whether a rank reads the base model's weights. Under fsdp only rank 0 does: the others
    build the model empty and get their shards from it (sharding.loading_device), so a pod
    without rank 0 needs the model's config and tokenizer but not its weights."""
    return spec.training.strategy != "fsdp" or rank_0


@dataclass(frozen=True)
class Snapshot:
    """One source's files at one commit in this process's hub cache (HF_HUB_CACHE): the folder the
    loaders read, and the mark that says it is whole. Without `weights`, whole means every file
    but the weights (`holds`): what a rank that builds the model empty reads."""

    kind: SourceKind
    repo: str
    commit: str
    weights: bool = True

    def holds(self, relative: str) -> bool:
        """Whether the file at `relative` in the folder is one of this snapshot's."""
        return self.weights or not _WEIGHTS.search(relative)

    @property
    def repo_type(self) -> str:
        """The Hub's kind of repo: a VAE's is a model repo."""
        return "dataset" if self.kind == "dataset" else "model"

    @property
    def folder(self) -> Path:
        return _hub_cache() / self._repo_folder / "snapshots" / self.commit

    def is_complete(self) -> bool:
        # A whole copy holds what a copy without the weights would.
        return self._mark.is_file() or replace(self, weights=True)._mark.is_file()

    def mark_complete(self) -> None:
        """Mark the folder whole. Written last and renamed into place, so a process killed
        mid-download or mid-copy leaves none."""
        self._mark.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._mark.with_name(f".{self._mark.name}.{os.getpid()}")
        tmp.write_text(str(self.folder))
        os.replace(tmp, self._mark)

    @contextmanager
    def filling(self) -> Iterator[None]:
        """Writing the snapshot's files: a full cache fails as the spec field that sizes it."""
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise no_space(f"the {self.kind} {self.repo}", _hub_cache()) from exc

    def lock(self) -> Any:
        """The file lock that lets one process of all those sharing the cache download it."""
        from filelock import FileLock

        self._mark.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._mark.with_suffix(".lock")))

    @property
    def _repo_folder(self) -> str:
        from huggingface_hub.file_download import repo_folder_name

        return repo_folder_name(repo_id=self.repo, repo_type=self.repo_type)

    @property
    def _mark(self) -> Path:
        kept = "" if self.weights else ".no-weights"
        return _hub_cache() / _MARKS / f"{self._repo_folder}--{self.commit}{kept}.complete"


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshots(spec: FineTuneJobSpec, commits: Commits, rank_0: bool = True) -> list[Snapshot]:
    """The snapshot of each hf:// source at the commit it resolved to, as rank 0 reads them or,
    with `rank_0` False, any other rank (reads_base_weights)."""
    weights = reads_base_weights(spec, rank_0)
    return [
        Snapshot(kind, repo, commit, weights=weights or kind != "model")
        for kind, (repo, _) in hub_sources(spec).items()
        if (commit := commits.of(kind)) is not None
    ]


def download(snap: Snapshot) -> Path:
    """The snapshot's folder, downloaded by whichever process (of this pod, or of every pod
    sharing the cache) gets the lock first."""
    from huggingface_hub import snapshot_download

    if snap.is_complete():
        return snap.folder
    kind, repo, commit = snap.kind, snap.repo, snap.commit
    with snap.lock():
        if not snap.is_complete():  # nobody fetched it while this process waited for the lock
            with snap.filling(), downloading(kind, repo, commit) as token:
                # A model's file list at that commit decides what to fetch; a dataset is
                # fetched whole (its builder picks its files).
                model = snap.repo_type == "model"
                wanted = _model_files(snap, token) if model else None
                snapshot_download(
                    repo,
                    repo_type=snap.repo_type,
                    revision=commit,
                    token=token,
                    allow_patterns=wanted,
                )
            snap.mark_complete()
            log.info("fetched %s %s at %s into %s", kind, repo, commit, _hub_cache())
    return snap.folder


def _model_files(snap: Snapshot, token: str | None) -> list[str]:
    """allow_patterns naming exactly the files to fetch (escaped: the patterns are fnmatch's)."""
    from huggingface_hub import HfApi, hf_hub_download

    repo, commit = snap.repo, snap.commit
    info = HfApi(token=token).model_info(repo, revision=commit, token=token)
    files = [s.rfilename for s in info.siblings or []]
    parts = None
    if PIPELINE_INDEX in files:
        index = hf_hub_download(repo, PIPELINE_INDEX, revision=commit, token=token)
        parts = pipeline_parts(json.loads(Path(index).read_text()))
    return [glob.escape(f) for f in model_files_to_fetch(files, parts) if snap.holds(f)]


class Peers(Protocol):
    """The job's ranks, as fetching needs them (`finetune_trainer.spread` gives a gang's)."""

    is_main: bool

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        ...

    def share(self, snapshots: list[Snapshot]) -> None:
        """Rank 0's copy of `snapshots` (what a rank other than 0 reads), sent to every pod
        whose hub cache lacks them."""
        ...


class Alone:
    """A job of one process: it is rank 0, and there is nobody to share with."""

    is_main = True

    def broadcast(self, value: Any) -> Any:
        return value

    def share(self, snapshots: list[Snapshot]) -> None:
        pass


def fetch_sources(spec: FineTuneJobSpec, root: Path, peers: Peers) -> Commits:
    """Every rank: the commits rank 0 resolved (or kept from an earlier attempt), fetched into
    the hub cache once and recorded for the loaders. With the Hub offline (HF_HUB_OFFLINE)
    nothing is resolved: the sources load from the cache as they are, at the spec's revisions.

    Rank 0 downloads; then `peers.share` sends its copy to the pods whose cache it did not
    reach, so a job asks the Hub for each file once whether or not its pods share a volume."""
    if not fetches(spec):
        return NO_COMMITS
    said: tuple[str, Any] = ("ok", None)
    if peers.is_main:
        try:
            said = ("ok", kept_or_resolved(spec, root))
        except SourceNotFound as exc:
            said = ("missing", (exc.kind, str(exc)))
        except ManifestError as exc:  # sources the cache cannot hold: every rank fails alike
            said = ("invalid", exc.errors)
        except Exception as exc:  # the Hub unreachable, 5xx: every rank fails alike, retryable
            failure = f"{type(exc).__name__}: {exc}"
            said = ("error", f"resolving the sources' revisions failed: {failure}")
    what, value = peers.broadcast(said)
    if what == "missing":
        raise SourceNotFound(value[0], value[1])
    if what == "invalid":
        raise ManifestError(value)
    if what == "error":
        raise RuntimeError(value)
    commits: Commits = value
    if peers.is_main:
        for snap in snapshots(spec, commits):
            download(snap)
    # Every pod but rank 0's reads what a rank other than 0 reads: under fsdp, not the weights.
    peers.share(snapshots(spec, commits, rank_0=False))
    for snap in snapshots(spec, commits, rank_0=peers.is_main):
        # Complete by now: rank 0's download, or the copy `share` sent. (A cache that still
        # lacked it would download its own.)
        _fetched[snap.kind] = (snap.repo, snap.commit, download(snap))
    return commits
