"""One version and one license: pyproject.toml's `[project]` is the source, everything else agrees.

Python code reads the version through finetune_api.version; the literals that cannot (the chart,
the Hub double's own distribution, the Dockerfile's defaults) are held to it here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from finetune_api.version import DISTRIBUTION, version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]


def test_the_source_is_pyproject() -> None:
    assert PYPROJECT["name"] == DISTRIBUTION
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)
    assert version() == VERSION  # the installed metadata (or the checkout) says the same


def test_python_readers_agree() -> None:
    import finetune_api
    import finetune_trainer
    from finetune_operator.settings import DEFAULT_TRAINER_IMAGE, Settings

    assert finetune_api.__version__ == finetune_trainer.__version__ == VERSION
    assert DEFAULT_TRAINER_IMAGE.endswith(f":{VERSION}")
    assert Settings().trainer_image == DEFAULT_TRAINER_IMAGE


def test_literals_agree() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (VERSION, VERSION)
    double = tomllib.loads((ROOT / "hub-double" / "pyproject.toml").read_text())["project"]
    assert double["version"] == VERSION
    defaults = re.findall(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert defaults and set(defaults) == {VERSION}


def test_the_declared_license_is_shipped() -> None:
    assert PYPROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # The Hub double is a distribution of its own, built from its own folder.
    double = tomllib.loads((ROOT / "hub-double" / "pyproject.toml").read_text())["project"]
    assert double["license"] == "Apache-2.0"
    assert (ROOT / "hub-double" / "LICENSE").read_text() == text


def test_a_checkout_that_was_never_installed_reads_pyproject(monkeypatch) -> None:
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version.__wrapped__() == VERSION
