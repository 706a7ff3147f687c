"""Suite-wide: how `make test` spreads the suites over pytest-xdist workers.

Each suite that owns a shared system runs whole on one worker: tests/kind (one kind cluster,
one Helm release) and tests/controlplane (one kube-apiserver harness per session). Every other
module runs whole on one worker, so its module fixtures (a trained gang that several tests read)
are built once. Workers take groups as they free up (`--dist loadgroup`), so the kind suite,
mostly waiting on pods, overlaps the CPU-bound trainer and unit modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Suites whose tests share one session-wide system: never split across workers.
WHOLE_SUITES = ("kind", "controlplane")


def _group(item: pytest.Item) -> str:
    relative = Path(str(item.path)).resolve().relative_to(TESTS)
    suite = relative.parts[0]
    return suite if suite in WHOLE_SUITES else relative.as_posix()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
