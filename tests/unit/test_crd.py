"""The generated CRD: fresh, structural, and faithful to the models."""

from typing import Any

import pytest
import yaml
from pydantic.alias_generators import to_snake

from finetune_api import crd
from finetune_api.constants import GROUP, PLURAL
from finetune_api.v1alpha1 import FineTuneJobSpec

FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title", "propertyNames"}


def walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key in ("properties",):
            for name, sub in node.get(key, {}).items():
                yield from walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def schema() -> dict:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_files_are_fresh():
    assert crd.main(["--check"]) == 0, "run: python -m finetune_api.crd"


def test_crd_file_is_the_generated_one():
    text = crd.CRD_PATHS[0].read_text()
    assert yaml.safe_load(text) == crd.build_crd()
    assert crd.CRD_PATHS[0].name == f"{GROUP}_{PLURAL}.yaml"


def test_every_node_is_structural(schema):
    for path, node in walk(schema):
        assert not FORBIDDEN & node.keys(), f"{path} has {FORBIDDEN & node.keys()}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if node.get("default", 0) is None:
            pytest.fail(f"{path} has default null")


def test_every_string_list_and_map_is_bounded(schema):
    for path, node in walk(schema):
        if path in ("", ".metadata", ".apiVersion", ".kind"):
            continue
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path} string without maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} list without maxItems"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path} map without maxProperties"


def test_every_spec_and_status_field_is_described(schema):
    for path, node in walk(schema):
        if path.startswith((".spec.", ".status.")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description for kubectl explain"


def test_defaults_are_declared_for_kubectl_get(schema):
    spec = schema["properties"]["spec"]["properties"]
    # The API server does not default inside a default, so an object's default is spelled out
    # in full, and it must equal what the models themselves default to.
    for name in ("peft", "training", "evaluation", "resources", "runPolicy"):
        model = FineTuneJobSpec.model_fields[to_snake(name)].default_factory()
        assert spec[name]["default"] == model.model_dump(by_alias=True, exclude_none=True), name
    assert spec["peft"]["properties"]["r"]["default"] == 8
    assert spec["training"]["properties"]["learningRate"]["default"] == 2.0e-4
    assert spec["runPolicy"]["properties"]["backoffLimit"]["default"] == 3
    # Optional fields stay unset rather than defaulting to an empty object.
    assert "default" not in spec["output"]["properties"]["hub"]
    assert "default" not in spec["dataset"]["properties"]["evalSplit"]


def test_cel_rules_are_present(schema):
    spec = schema["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("oldSelf.model" in r for r in rules), "spec immutability rule missing"
    assert any("qlora" in r for r in rules)
    dataset_rules = spec["properties"]["dataset"]["x-kubernetes-validations"]
    assert any("evalFraction" in r["rule"] for r in dataset_rules)
    assert "metadata.name" in schema["x-kubernetes-validations"][0]["rule"]
    run_policy = spec["properties"]["runPolicy"]["x-kubernetes-validations"][0]["rule"]
    assert "suspend" not in run_policy and "backoffLimit" in run_policy
    # Mutable, like activeDeadlineSeconds: a job stuck for a reason being fixed may get longer.
    assert "pendingTimeoutSeconds" not in run_policy
    pending = spec["properties"]["runPolicy"]["properties"]["pendingTimeoutSeconds"]
    assert (pending["default"], pending["minimum"]) == (600, 30)
    assert pending["description"].startswith("pendingTimeoutSeconds ")
    status = schema["properties"]["status"]["properties"]
    assert status["disruptions"]["description"].startswith("disruptions ")


def test_printer_columns_and_names():
    version = crd.build_crd()["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == [
        "Phase", "Nodes", "Progress", "Loss", "Eval", "Revision", "Reason", "Attempts",
        "Disruptions", "Age"
    ]  # fmt: skip
    # The three before Age show with -o wide only.
    priorities = [c.get("priority", 0) for c in version["additionalPrinterColumns"]]
    assert priorities[-4:] == [1, 1, 1, 0]
    names = crd.build_crd()["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["ml"]
    assert version["subresources"] == {"status": {}}


def test_untranslatable_union_fails_loudly():
    from pydantic import BaseModel

    class Bad(BaseModel):
        value: int | list[int]

    with pytest.raises(crd.UntranslatableSchema, match="value"):
        crd.to_structural(Bad)


def test_conditions_are_a_map_keyed_by_type_with_rfc3339_times(schema):
    status = schema["properties"]["status"]["properties"]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    # A map key must be required, or the API server rejects the CRD.
    assert "type" in conditions["items"]["required"]
    times = [
        conditions["items"]["properties"]["lastTransitionTime"],
        status["startTime"],
        status["completionTime"],
        status["progress"]["properties"]["updatedAt"],
    ]
    assert all(t["format"] == "date-time" for t in times)


# Subtrees the schema passes through as Kubernetes objects (pod-spec parts): not bounded here,
# and the only ones allowed to be open.
OPEN = {
    ".template.env[].valueFrom",
    ".template.tolerations[]",
    ".template.affinity",
    ".template.volumes[]",
}


def worst_case_bytes(node: dict, path: str, open_paths: list[str]) -> int:
    """The longest JSON the schema admits at `node` (quotes and separators counted, escapes
    not), with preserve-unknown subtrees counted as empty and listed in `open_paths`."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        open_paths.append(path)
        return 2
    if node.get("x-kubernetes-int-or-string"):
        return max(node["maxLength"] + 2, 20)
    kind = node.get("type")
    if kind == "string":
        longest = max(len(e) for e in node["enum"]) if "enum" in node else node["maxLength"]
        return longest + 2
    if kind in ("integer", "number", "boolean"):
        return 24
    if kind == "array":
        return 2 + node["maxItems"] * (worst_case_bytes(node["items"], f"{path}[]", open_paths) + 1)
    if "additionalProperties" in node:
        rules = " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
        key = int(rules.split("k.size() <= ")[1].split(")")[0])
        value = worst_case_bytes(node["additionalProperties"], f"{path}{{}}", open_paths)
        return 2 + node["maxProperties"] * (key + 4 + value)
    props = node.get("properties", {})
    return 2 + sum(
        len(k) + 4 + worst_case_bytes(v, f"{path}.{k}", open_paths) for k, v in props.items()
    )


def test_the_largest_spec_the_schema_admits_stays_small(schema):
    """kubectl apply keeps the whole object in a 256 kB annotation, and the children repeat the
    spec: the typed spec's worst case must leave room (kopf's own copy holds runPolicy only)."""
    from finetune_api.v1alpha1 import SPEC_MAX_BYTES

    open_paths: list[str] = []
    size = worst_case_bytes(schema["properties"]["spec"], "", open_paths)
    assert size <= SPEC_MAX_BYTES, f"the spec can reach {size} bytes"
    assert set(open_paths) == OPEN


def test_map_keys_are_bounded_by_cel(schema):
    requests = schema["properties"]["spec"]["properties"]["resources"]["properties"]["requests"]
    assert {"rule": "self.all(k, k.size() <= 253)", "message": "keys must be at most 253 "
            "characters"} in requests["x-kubernetes-validations"]  # fmt: skip
    assert requests["additionalProperties"]["maxLength"] == 64
