"""Fingerprints for `Dataset.map`, so that a cached result is reused only when nothing that shaped
it changed.

`datasets` names a map's cache file by the input's fingerprint and a hash of the function. That
hash pickles a module-level helper the function calls (`tokenize_chat`, `_tokenize_text`) by its
name, not its code, so after an edit of the trainer, local mode, whose datasets cache outlives
runs, read rows the old code had made. `Dataset.map` takes an explicit `new_fingerprint` for a
result its own hash cannot tell apart; `map_fingerprint` is that one: the input's fingerprint, a
digest of the trainer's source and of the versions of the libraries that tokenize, a name for the
step and what shapes it (spec fields, the tokenizer). The ranks after the main process
(`main_process_first`) compute the same fingerprint and still reuse its file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

from datasets import Dataset
from datasets.fingerprint import Hasher

__all__ = ["code_digest", "map_fingerprint"]

# Their versions change what a tokenizer or a chat template makes of the same text.
_LIBRARIES = ("datasets", "tokenizers", "transformers", "jinja2")


@functools.cache
def code_digest() -> str:
    """A digest of the installed trainer's source files and of `_LIBRARIES`' versions.

    The whole package, not the functions a map calls: which of them a step reaches is not
    knowable without running it, and re-tokenizing after an unrelated edit costs seconds where
    stale rows cost a wrong run. In an image the digest is fixed, so pods reuse their cache."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    for name in _LIBRARIES:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}\0".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name} absent\0".encode())
    return digest.hexdigest()


def map_fingerprint(ds: Dataset, step: str, *shapes: object) -> str:
    """The `new_fingerprint` of `ds.map(...)` for step `step` (e.g. "tokenize", "pack"), shaped by
    `shapes`: what besides the trainer's code decides the output rows (spec fields as plain
    data, a tokenizer, which `datasets`' Hasher hashes by its state)."""
    return Hasher.hash((ds._fingerprint, code_digest(), step, shapes))
