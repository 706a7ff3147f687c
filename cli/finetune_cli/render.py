"""`finetune render`: the objects the installed chart's operator would create for a manifest.

The operator's Settings come from the chart's values, exactly as its Deployment passes them
(Settings.from_chart_values): the chart's values.yaml, then each --values file merged over it the
way helm merges them. So a platform team's values file shows here what its users' jobs get.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from finetune_cli import manifests
from finetune_cli.exits import CommandError, Exit

# A source checkout (and so the dev install): cli/finetune_cli/render.py -> the repository.
CHECKOUT_CHART = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"


def chart_dir(explicit: Path | None) -> Path:
    chart = explicit or CHECKOUT_CHART
    if not (chart / "Chart.yaml").is_file() or not (chart / "values.yaml").is_file():
        where = f"{chart} is not" if explicit else "no chart next to this installation, and none"
        raise CommandError(
            f"{where} a finetune-operator chart directory; pass --chart "
            "(for example a checkout's charts/finetune-operator, or `helm pull --untar` of it)",
            Exit.USAGE,
        )
    return chart


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """helm's merge of a values file over the chart's: maps merge key by key, anything else
    (lists included) is replaced, and null deletes the chart's key."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def unknown_keys(values: Mapping[str, Any], schema: Mapping[str, Any]) -> Iterator[str]:
    """Keys the chart's values.schema.json does not allow, as dotted paths: helm refuses to
    install with them, so rendering them would show what no operator runs. Only closed objects
    (additionalProperties: false) are checked; the rest of the schema is helm's business."""
    definitions = schema.get("definitions") or {}

    def resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
        while "$ref" in node:
            node = definitions.get(str(node["$ref"]).rsplit("/", 1)[-1], {})
        return node

    def walk(value: Any, node: Mapping[str, Any], path: str) -> Iterator[str]:
        node = resolve(node)
        if not isinstance(value, Mapping):
            return
        properties = node.get("properties") or {}
        for key, child in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in properties:
                yield from walk(child, properties[key], where)
            elif node.get("additionalProperties") is False:
                yield where

    yield from walk(values, schema, "")


def chart_values(chart: Path, files: list[Path]) -> tuple[dict[str, Any], str]:
    """(values, appVersion): the chart's defaults with each file merged over them in order."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text()) or {}
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CommandError(f"--values {path}: {exc}", Exit.USAGE) from None
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise CommandError(f"--values {path}: not a YAML mapping", Exit.USAGE)
        values = merge_values(values, doc)
    schema_file = chart / "values.schema.json"
    if schema_file.is_file():
        bad = list(unknown_keys(values, json.loads(schema_file.read_text())))
        if bad:
            raise CommandError(
                f"values the chart's schema does not allow: {', '.join(bad)}", Exit.USAGE
            )
    return values, str(meta.get("appVersion") or meta.get("version") or "")


def cmd_render(args: argparse.Namespace) -> int:
    from finetune_operator.render import render_manifests
    from finetune_operator.settings import Settings

    job, _ = manifests.load_one(args.manifest, local=False)  # a cluster's files, not this host's
    values, app_version = chart_values(chart_dir(args.chart), args.values)
    try:
        settings = Settings.from_chart_values(values, app_version=app_version)
    except (KeyError, TypeError, ValueError) as exc:
        message = f"the chart values do not configure the operator: {exc!r}"
        raise CommandError(message, Exit.USAGE) from None
    docs = render_manifests(job, settings)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False, explicit_start=True)
    return Exit.OK
