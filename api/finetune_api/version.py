"""The project's version, from its one source: `[project] version` in pyproject.toml.

Installed (the images, the dev venv's editable install), it is read from the distribution's
metadata; in a checkout that is only on PYTHONPATH, from pyproject.toml beside api/. Every other
place that needs it reads it here: `finetune --version`, the operator's built-in trainer image tag
(finetune_operator.settings) and `finetune_trainer.__version__`. The Chart's `version` and
`appVersion`, hub-double/pyproject.toml and the Dockerfile's VERSION defaults are literals that
tests/unit/test_packaging.py holds to it.
"""

from __future__ import annotations

import functools
from pathlib import Path

DISTRIBUTION = "finetune-operator"
# The checkout's pyproject.toml, for a tree that was never installed.
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@functools.cache
def version() -> str:
    """The version of the finetune-operator distribution, such as 0.1.0."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:
        pass
    import tomllib

    try:
        return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
