"""Parse a FineTuneJob manifest and report every problem with its field path.

This is what `finetune validate`, `finetune run` and the in-pod trainer use. It applies the same
structural constraints and cross-field rules as the CRD, so a manifest that passes here passes the
API server's validation too (the control-plane tests hold the two to that).
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune_api.rules import Rule
from finetune_api.v1alpha1 import NAME_RULE, FineTuneJob


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(ValueError):
    """A manifest that does not satisfy the schema; `errors` lists every problem found."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def _wire_path(loc: tuple[int | str, ...]) -> str:
    """Render pydantic's location (aliases, since input is by alias) as a manifest path."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _iter_rule_errors(obj: BaseModel, path: str) -> Iterator[FieldError]:
    for rule in getattr(type(obj), "__rules__", ()):
        if isinstance(rule, Rule) and not rule.check(obj):
            field = f"{path}.{rule.field}" if rule.field else path
            yield FieldError(field.lstrip("."), rule.message)
    for name, info in type(obj).model_fields.items():
        value = getattr(obj, name)
        wire = f"{path}.{info.alias or name}"
        if isinstance(value, BaseModel):
            yield from _iter_rule_errors(value, wire)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _iter_rule_errors(item, f"{wire}[{i}]")


def parse_manifest(doc: Mapping[str, Any]) -> FineTuneJob:
    """Validate a manifest document; raise ManifestError naming every bad field."""
    if not isinstance(doc, Mapping):
        raise ManifestError([FieldError("", "a FineTuneJob manifest must be a YAML mapping")])
    try:
        job = FineTuneJob.model_validate(doc)
    except ValidationError as exc:
        errors = [
            FieldError(_wire_path(tuple(e["loc"])), e["msg"]) for e in exc.errors(include_url=False)
        ]
        raise ManifestError(errors) from None
    rule_errors = list(_iter_rule_errors(job, ""))
    if not NAME_RULE.check(job):
        rule_errors.insert(0, FieldError("metadata.name", NAME_RULE.message))
    if rule_errors:
        raise ManifestError(rule_errors)
    return job


def load_manifest(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob from a YAML file (the first document of kind FineTuneJob)."""
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError([FieldError("", f"not valid YAML: {exc}")]) from None
    if not docs:
        raise ManifestError([FieldError("", f"{path} holds no document")])
    jobs = [d for d in docs if isinstance(d, Mapping) and d.get("kind") == "FineTuneJob"]
    return parse_manifest(jobs[0] if jobs else docs[0])
