"""Reading FineTuneJob manifests: files or stdin, one or many YAML documents, every error kept.

The schema check is finetune_api's, the same models and rules the CRD is generated from, so a
manifest that passes here passes the API server too. Nothing here imports torch or a client:
`finetune validate` must stay fast enough for an editor hook or a CI step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from finetune_api import FieldError, FineTuneJob, ManifestError, parse_manifest
from finetune_api.constants import KIND
from finetune_cli.exits import CommandError, Exit

STDIN = "-"


@dataclass
class Document:
    """One FineTuneJob document of a source, with every problem found in it."""

    source: str  # the file as given, or "<stdin>"
    index: int | None  # 1-based position in a multi-document source; None for a single document
    raw: dict[str, Any] | None = None
    job: FineTuneJob | None = None
    errors: list[FieldError] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.source if self.index is None else f"{self.source}#{self.index}"

    @property
    def valid(self) -> bool:
        return self.job is not None and not self.errors

    @property
    def name(self) -> str | None:
        metadata = (self.raw or {}).get("metadata")
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        return name if isinstance(name, str) else None


def read_text(source: str, stdin: TextIO) -> tuple[str, str]:
    """(label, text) of a path or `-`; an unreadable file is an error of that source."""
    if source == STDIN:
        return "<stdin>", stdin.read()
    try:
        return source, Path(source).read_text()
    except OSError as exc:
        raise ManifestError([FieldError("", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ManifestError([FieldError("", "not a text file")]) from None


def parse_documents(label: str, text: str) -> list[Document]:
    """Every FineTuneJob document of one source, schema-checked.

    Documents of other kinds (a Secret beside the job, say) are skipped. A single document of
    no or another kind is still checked, so that its errors say what is wrong with it.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [Document(label, None, errors=[FieldError("", f"not valid YAML: {exc}")])]
    if not docs:
        return [Document(label, None, errors=[FieldError("", "holds no document")])]
    numbered = list(enumerate(docs, start=1))
    jobs = [(i, d) for i, d in numbered if isinstance(d, Mapping) and d.get("kind") == KIND]
    if not jobs and len(docs) > 1:
        kinds = sorted({str(d.get("kind")) for d in docs if isinstance(d, Mapping)})
        message = f"holds no {KIND} document (kinds: {', '.join(kinds) or 'none'})"
        return [Document(label, None, errors=[FieldError("", message)])]
    out = []
    for i, doc in jobs or numbered:
        entry = Document(label, i if len(docs) > 1 else None)
        entry.raw = dict(doc) if isinstance(doc, Mapping) else None
        try:
            entry.job = parse_manifest(doc)
        except ManifestError as exc:
            entry.errors = list(exc.errors)
        out.append(entry)
    return out


def check(sources: Iterable[str], *, local: bool, stdin: TextIO | None = None) -> list[Document]:
    """Every FineTuneJob of every source; `local` adds this machine's checks (files, CUDA)."""
    out: list[Document] = []
    for source in sources:
        try:
            label, text = read_text(source, stdin or sys.stdin)
        except ManifestError as exc:
            out.append(Document(source, None, errors=list(exc.errors)))
            continue
        out += parse_documents(label, text)
    if local:
        # Only here: the trainer's checks import torch when the spec needs CUDA.
        from finetune_trainer.chat import local_data_errors
        from finetune_trainer.env import runtime_errors

        for doc in out:
            if doc.job is not None and not doc.errors:
                doc.errors = runtime_errors(doc.job)
            if doc.job is not None and not doc.errors:
                # Data on this machine can be read now rather than fail a pod later.
                doc.errors = local_data_errors(doc.job)
    return out


def report(docs: list[Document]) -> dict[str, Any]:
    """The machine-readable form of `finetune validate -o json`."""
    return {
        "valid": all(d.valid for d in docs),
        "documents": [
            {
                "source": d.source,
                "document": d.index,
                "name": d.name,
                "valid": d.valid,
                "errors": [{"path": e.path, "message": e.message} for e in d.errors],
            }
            for d in docs
        ],
    }


def print_report(docs: list[Document], out: TextIO, err: TextIO) -> None:
    """Valid documents on `out`; every error on `err` as `SOURCE: FIELD.PATH: message`."""
    for doc in docs:
        if doc.valid:
            print(f"{doc.label}: {KIND} {doc.name} is valid", file=out)
        for error in doc.errors:
            print(f"{doc.label}: {error}", file=err)
    invalid = sum(not d.valid for d in docs)
    if invalid and len(docs) > 1:
        print(f"{invalid} of {len(docs)} documents invalid", file=err)


def load_one(path: Path, *, local: bool) -> tuple[FineTuneJob, dict[str, Any]]:
    """The one FineTuneJob of a file (for run and render); errors as a CommandError."""
    docs = check([str(path)], local=local)
    bad = [d for d in docs if not d.valid]
    if bad:
        print_report(bad, sys.stdout, sys.stderr)
        raise CommandError(f"{path} is not a valid {KIND}", Exit.INVALID)
    if len(docs) != 1:
        raise CommandError(f"{path} holds {len(docs)} {KIND}s; pass a file with one", Exit.USAGE)
    assert docs[0].job is not None and docs[0].raw is not None
    return docs[0].job, docs[0].raw
