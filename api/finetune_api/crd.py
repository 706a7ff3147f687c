"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema; the API server wants a structural OpenAPI v3 schema. `to_structural`
rewrites one into the other and raises on anything it cannot translate, rather than emitting a
schema the API server would reject or silently loosen.

    python -m finetune_api.crd            # rewrite crds/ and the chart's template of it
    python -m finetune_api.crd --check    # exit 1 if either file is stale

crds/ is the source of truth (the control-plane tests and `kubectl apply` read it). The chart
ships the same CRD as a template behind `crds.install`, not in its crds/ directory: helm installs
crds/ once and never upgrades it, so new fields would be pruned silently after `helm upgrade`.
"""

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_api.constants import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ConditionType,
)
from finetune_api.v1alpha1 import NAME_RULE, FineTuneJobSpec, FineTuneJobStatus

Schema = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "finetune-operator"
CRD_FILE = REPO_ROOT / "crds" / f"{GROUP}_{PLURAL}.yaml"
CHART_CRD_TEMPLATE = CHART_DIR / "templates" / "crd" / f"{GROUP}_{PLURAL}.yaml"
# The generated files: the plain CRD first, then the chart's template of it.
CRD_PATHS = (CRD_FILE, CHART_CRD_TEMPLATE)
# helm installs whatever lies here on first install, besides the template: the CRD twice.
CHART_CRDS_DIR = CHART_DIR / "crds"

# Keywords that have no structural-schema counterpart and carry no validation we would lose.
_DROPPED = {"title", "$defs"}
_ALLOWED = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}


class UntranslatableSchema(ValueError):
    pass


def _resolve(node: Schema, defs: dict[str, Schema], path: str) -> Schema:
    """Inline `$ref`, keeping sibling keywords such as description."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    if name not in defs:
        raise UntranslatableSchema(f"{path}: unresolved $ref {node['$ref']}")
    merged = copy.deepcopy(defs[name])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    merged["__model__"] = name
    return merged


def _collapse_any_of(node: Schema, path: str) -> Schema:
    options = node.get("anyOf")
    if options is None:
        return node
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    non_null = [o for o in options if o != {"type": "null"}]
    if len(non_null) == 1:  # Optional[T]: nullable in Python, absent on the wire
        if "default" in rest and rest["default"] is None:
            del rest["default"]
        return {**non_null[0], **rest}
    if sorted(o.get("type") for o in non_null) == ["integer", "string"]:
        # The string's own bounds still apply to a string value (a quantity such as 8Gi).
        string = next(o for o in non_null if o.get("type") == "string")
        bounds = {k: string[k] for k in ("maxLength", "pattern") if k in string}
        return {**rest, **bounds, "x-kubernetes-int-or-string": True}
    raise UntranslatableSchema(f"{path}: union {options} has no structural form")


def _convert(node: Schema, defs: dict[str, Schema], models: dict[str, type], path: str) -> Schema:
    node = _collapse_any_of(_resolve(node, defs, path), path)
    node = _resolve(node, defs, path)  # Optional[Model] collapses to a $ref first
    model_name = node.pop("__model__", None)
    optional = node.pop("__optional__", False)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "properties":
            out["properties"] = {
                name: _convert(sub, defs, models, f"{path}.{name}") for name, sub in value.items()
            }
        elif key == "propertyNames":
            # Structural schemas have no propertyNames: a bound on map keys becomes CEL.
            if set(value) != {"maxLength"}:
                raise UntranslatableSchema(f"{path}: propertyNames {value} has no structural form")
            rule = {
                "rule": f"self.all(k, k.size() <= {value['maxLength']})",
                "message": f"keys must be at most {value['maxLength']} characters",
            }
            out.setdefault("x-kubernetes-validations", []).append(rule)
        elif key == "items":
            out["items"] = _convert(value, defs, models, f"{path}[]")
        elif key == "additionalProperties":
            if value is False:
                continue  # extra="forbid": the API server prunes unknown fields instead
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out["additionalProperties"] = _convert(value, defs, models, f"{path}{{}}")
        elif key in _ALLOWED:
            out[key] = value
        else:
            raise UntranslatableSchema(f"{path}: keyword {key!r} has no structural form")
    if out.get("x-kubernetes-preserve-unknown-fields") and out.get("type") is None:
        out["type"] = "object"
    if model_name in models:  # enums are $defs too, but carry no rules
        _add_rules(out, models[model_name])
        _default_optional_children(out)
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise UntranslatableSchema(f"{path}: no type")
    if optional:
        out["__optional__"] = True
    return out


def _add_rules(out: Schema, model: type[BaseModel]) -> None:
    rules = [r.to_crd() for r in model.__dict__.get("__rules__", ())]
    if rules:
        out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), *rules]


def _default_optional_children(obj: Schema) -> None:
    """Give optional object/list/map properties a default, so that `kubectl get -o yaml` shows
    them (pydantic's default_factory).

    An object's default is spelled out in full from its children's defaults, not `{}`: the API
    server checks a default against the CEL rules as written, without defaulting inside it, so
    `{}` fails a rule such as `self.type == 'cpu'` with "no such key: type" and the whole CRD is
    rejected. Children are converted first, so their own defaults are already complete here.
    """
    required = set(obj.get("required", ()))
    for name, prop in obj.get("properties", {}).items():
        if name in required or "default" in prop or prop.pop("__optional__", False):
            continue
        if prop.get("type") == "array":
            prop["default"] = []
        elif prop.get("type") == "object" and not prop.get("x-kubernetes-preserve-unknown-fields"):
            prop["default"] = {
                key: copy.deepcopy(sub["default"])
                for key, sub in prop.get("properties", {}).items()
                if "default" in sub
            }


def _mark_optional_models(schema: Schema) -> None:
    """Remember which properties were Optional[...] before anyOf collapses: those stay unset."""
    for container in [schema, *schema.get("$defs", {}).values()]:
        for prop in container.get("properties", {}).values():
            if any(o == {"type": "null"} for o in prop.get("anyOf", ())):
                prop["__optional__"] = True


def to_structural(model: type[BaseModel]) -> Schema:
    """The structural OpenAPI schema of a pydantic model, with its CEL rules."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    _mark_optional_models(schema)
    defs = schema.get("$defs", {})
    models = _collect_models(model)
    schema["__model__"] = model.__name__
    return _strip_markers(_convert(schema, defs, models, model.__name__))


def _strip_markers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_markers(v) for k, v in node.items() if k != "__optional__"}
    if isinstance(node, list):
        return [_strip_markers(v) for v in node]
    return node


def _collect_models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for field in tp.model_fields.values():
                visit(field.annotation)
        for arg in getattr(tp, "__args__", ()) or ():
            visit(arg)

    visit(root)
    return found


def _printer_columns() -> list[Schema]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
        {
            "name": "Progress",
            "type": "integer",
            "jsonPath": ".status.progress.percent",
            "description": "Percent of the planned optimizer steps done.",
        },
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {
            "name": "Eval",
            "type": "string",
            "jsonPath": ".status.evaluationSummary",
            "description": "The first gated (or first) metric, before and after training.",
        },
        {
            "name": "Revision",
            "type": "string",
            "jsonPath": ".status.result.revision",
            "priority": 0,
        },
        # With -o wide: why a job is where it is, without a describe.
        {
            "name": "Reason",
            "type": "string",
            "jsonPath": f'.status.conditions[?(@.type=="{ConditionType.RUNNING}")].reason',
            "priority": 1,
            "description": "The Running condition's reason: why the job trains or does not "
            "(PodsPending, Unschedulable, Restarting, NodeNotReady, QuotaExceeded, "
            "SecretNotFound, ...), or how it ended.",
        },
        {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1},
        {
            "name": "Disruptions",
            "type": "integer",
            "jsonPath": ".status.disruptions",
            "priority": 1,
            "description": "Restarts a disruption caused (an eviction, a deleted pod, a lost "
            "node), which do not count against runPolicy.backoffLimit.",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> Schema:
    spec = to_structural(FineTuneJobSpec)
    status = to_structural(FineTuneJobStatus)
    spec["description"] = "FineTuneJobSpec is what to fine-tune, on what, and where it goes."
    status["description"] = (
        "FineTuneJobStatus is observed by the operator; conditions are the truth."
    )
    root: Schema = {
        "type": "object",
        "description": "FineTuneJob fine-tunes a Hugging Face model with LoRA (or fully) on a gang "
        "of pods, evaluates it, and pushes the result to the Hub.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion: finetune.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind: FineTuneJob."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [NAME_RULE.to_crd()],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                }
            ],
        },
    }


HEADER = "# Generated by `python -m finetune_api.crd`. Do not edit.\n"
# The chart's labels and the crds.keep annotation come from a helper in the chart, so that the
# generated text holds no chart logic beyond the crds.install switch.
_TEMPLATE_HEAD = (
    "{{- /* Generated by `python -m finetune_api.crd` from crds/%s. Do not edit. */ -}}\n"
    "{{- if .Values.crds.install }}\n"
)
_TEMPLATE_METADATA = '  {{- include "finetune-operator.crdMetadata" . | nindent 2 }}\n'


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def render_chart_template(crd_yaml: str) -> str:
    """The chart's template of the CRD: the same document behind `crds.install`, with the
    chart's labels and annotations added to its metadata."""
    body = crd_yaml.removeprefix(HEADER)
    # Go templates read `{{` as the start of an action anywhere, also inside a CEL rule or a
    # description; print it literally instead. A lone `}}` is plain text to them.
    body = body.replace("{{", '{{ "{{" }}')
    name_line = f"metadata:\n  name: {PLURAL}.{GROUP}\n"
    if body.count(name_line) != 1:
        raise UntranslatableSchema(f"CRD metadata is not the one line {name_line!r}")
    body = body.replace(name_line, name_line + _TEMPLATE_METADATA)
    return _TEMPLATE_HEAD % CRD_FILE.name + body + "{{- end }}\n"


def render_outputs() -> dict[Path, str]:
    """Each generated file and its content."""
    text = render_crd_yaml()
    return {CRD_FILE: text, CHART_CRD_TEMPLATE: render_chart_template(text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a CRD file is stale")
    args = parser.parse_args(argv)
    outputs = render_outputs()
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {_shown(p)} (run python -m finetune_api.crd)")
        if CHART_CRDS_DIR.exists():
            print(f"remove {_shown(CHART_CRDS_DIR)}: the chart installs the CRD from its template")
        return 1 if stale or CHART_CRDS_DIR.exists() else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(outputs[p])
        print(f"wrote {_shown(p)}")
    return 0


def _shown(path: Path) -> Path:
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


if __name__ == "__main__":
    sys.exit(main())
