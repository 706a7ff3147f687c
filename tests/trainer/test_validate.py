"""`finetune validate` and `finetune train`: every broken manifest exits 3 naming the bad field.

The schema checks run by default; what only this machine can answer (local files, a CUDA GPU)
runs behind --local, and `finetune train` (the pod) always runs both.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import FINETUNE, deep_update

# (change, the field named) for manifests the schema itself rejects.
SCHEMA: dict[str, tuple[dict[str, Any], str]] = {
    "unknown task": ({"spec": {"model": {"task": "translation"}}}, "spec.model.task"),
    "lora rank zero": ({"spec": {"peft": {"r": 0}}}, "spec.peft.r"),
    "negative learning rate": (
        {"spec": {"training": {"learningRate": -0.001}}},
        "spec.training.learningRate",
    ),
    "no dataset source": ({"spec": {"dataset": {"textField": "text"}}}, "spec.dataset.source"),
    "qlora on a cpu gang": ({"spec": {"peft": {"method": "qlora"}}}, "spec.peft.method"),
    "gate on an uncomputed metric": (
        {"spec": {"evaluation": {"metrics": ["perplexity"], "gates": {"accuracy": 0.9}}}},
        "spec.evaluation.gates",
    ),
}
# Valid for the schema (and so for a cluster), wrong for this machine.
LOCAL: dict[str, tuple[dict[str, Any], str]] = {
    "qlora without cuda here": (
        {
            "spec": {
                "peft": {"method": "qlora"},
                "resources": {"accelerator": {"type": "nvidia.com/gpu", "count": 1}},
            }
        },
        "spec.peft.method",
    ),
    "missing model folder": (
        {"spec": {"model": {"source": "file:///nonexistent/model"}}},
        "spec.model.source",
    ),
    "missing data file": (
        {"spec": {"dataset": {"source": "file:///nonexistent/data.jsonl"}}},
        "spec.dataset.source",
    ),
}


def _validate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FINETUNE, "validate", *args], env=env, capture_output=True, text=True, timeout=120
    )


def _broken(doc: dict[str, Any], change: dict[str, Any], case: str) -> dict[str, Any]:
    doc = deep_update(doc, change)
    if case == "no dataset source":
        del doc["spec"]["dataset"]["source"]
    return doc


def test_valid_manifest(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    path = write_manifest(causal_manifest)
    for extra in ([], ["--local"]):
        done = _validate(str(path), *extra, env=base_env)
        assert done.returncode == 0, done.stderr
        name = causal_manifest["metadata"]["name"]
        assert done.stdout.strip() == f"{path}: FineTuneJob {name} is valid"


@pytest.mark.parametrize("case", list(SCHEMA), ids=list(SCHEMA))
def test_schema_error_exits_3_naming_the_field(
    case: str,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    change, field = SCHEMA[case]
    path = write_manifest(_broken(causal_manifest, change, case))
    done = _validate(str(path), env=base_env)
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"{path}: {field}: ") for line in lines), lines


@pytest.mark.parametrize("case", list(LOCAL), ids=list(LOCAL))
def test_machine_checks_run_only_with_local(
    case: str,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    change, field = LOCAL[case]
    path = write_manifest(_broken(causal_manifest, change, case))
    schema_only = _validate(str(path), env=base_env)
    assert schema_only.returncode == 0, schema_only.stderr
    done = _validate("--local", str(path), env=base_env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert any(line.startswith(f"{path}: {field}: ") for line in done.stderr.splitlines())


def test_every_error_is_listed(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    doc = deep_update(causal_manifest, {"spec": {"peft": {"r": 0}, "training": {"epochs": 0}}})
    path = write_manifest(doc)
    done = _validate(str(path), "-o", "json", env=base_env)
    assert done.returncode == 3
    report = json.loads(done.stdout)
    assert report["valid"] is False
    [entry] = report["documents"]
    assert {e["path"] for e in entry["errors"]} >= {"spec.peft.r", "spec.training.epochs"}


def test_train_refuses_a_bad_spec_before_starting_ranks(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    doc = deep_update(causal_manifest, {"spec": {"model": {"source": "file:///nonexistent/m"}}})
    done = subprocess.run(
        [*FINETUNE, "train", str(write_manifest(doc))],
        env={**base_env, "FINETUNE_RESULT_FILE": str(tmp_path / "result.json")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3
    assert "spec.model.source: /nonexistent/m does not exist" in done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    # Permanent (exit code 3), with the reason of its own that a missing source has.
    assert (result["status"], result["reason"]) == ("Failed", "ModelNotFound")
