"""The standard-library scripts under hack/ as modules, for the tests that exercise them.

hack/ is no package (its scripts run before any venv exists), so each is imported from its file.
Importable from every suite: pytest puts tests/ on sys.path for tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HACK = Path(__file__).resolve().parents[1] / "hack"


def hack_script(relative: str) -> ModuleType:
    """hack/RELATIVE (e.g. "image_context.py", "kind/load_layers.py") imported once, as a module
    named after its file, and registered in sys.modules, where dataclasses look their module up."""
    path = HACK / relative
    name = path.stem.replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
