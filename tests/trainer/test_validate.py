"""`finetune validate`: every broken manifest exits 3 and names the field that is wrong."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import FINETUNE, deep_update

BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "unknown task": ({"spec": {"model": {"task": "translation"}}}, "spec.model.task"),
    "lora rank zero": ({"spec": {"peft": {"r": 0}}}, "spec.peft.r"),
    "negative learning rate": (
        {"spec": {"training": {"learningRate": -0.001}}},
        "spec.training.learningRate",
    ),
    "no dataset source": ({"spec": {"dataset": {"textField": "text"}}}, "spec.dataset.source"),
    "qlora on a cpu gang": ({"spec": {"peft": {"method": "qlora"}}}, "spec.peft.method"),
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
    "gate on an uncomputed metric": (
        {"spec": {"evaluation": {"metrics": ["perplexity"], "gates": {"accuracy": 0.9}}}},
        "spec.evaluation.gates",
    ),
}


def _validate(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FINETUNE, "validate", str(path)], env=env, capture_output=True, text=True, timeout=120
    )


def test_valid_manifest(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    done = _validate(write_manifest(causal_manifest), base_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "valid"


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_broken_manifest_exits_3_naming_the_field(
    case: str,
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    change, field = BROKEN[case]
    doc = deep_update(causal_manifest, change)
    if case == "no dataset source":
        del doc["spec"]["dataset"]["source"]
    done = _validate(write_manifest(doc), base_env)
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"{field}: ") for line in lines), lines


def test_every_error_is_listed(
    causal_manifest: dict[str, Any],
    write_manifest: Callable[..., Path],
    base_env: dict[str, str],
) -> None:
    doc = deep_update(causal_manifest, {"spec": {"peft": {"r": 0}, "training": {"epochs": 0}}})
    done = _validate(write_manifest(doc), base_env)
    assert done.returncode == 3
    fields = {line.split(": ", 1)[0] for line in done.stderr.splitlines()}
    assert {"spec.peft.r", "spec.training.epochs"} <= fields


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
    assert (result["status"], result["reason"]) == ("Failed", "InvalidSpec")
