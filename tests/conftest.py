"""What every suite shares: the marks that leave a test out of `make test` unless -m names them.

`make test` is the tier CI runs on every change: each capability proven once, on real parts. The
opt-in marks hold what it leaves out:

- `extended`: a longer variant of what that tier already proves (another task's run through the
  same launcher, the same fault on another path). `make test-all` runs it with everything else.
- `bench`: a measurement (`make bench`), not a check.
- `kueue`: the run against the real Kueue controller (`make test-kueue`), whose first build of
  Kueue takes minutes.

`make test` runs three pytest-xdist workers, which take whole groups of tests (group_of). A suite
whose session fixtures stand up one shared thing (the kind cluster with the chart installed, the
local control plane) is one group, so a single worker runs it in order and sets it up once; any
other module is a group of its own. A worker that runs out of tests takes the next group in
collection order, which this file sets to SUITE_ORDER: the kind suite first, since it is the
longest group and mostly waits on pods, then the control plane, which mostly waits on the API
server, then the CPU-bound trainer modules beside them (the third worker starts on them at
once), and the short modules last to even out the end. What a suite stood up goes down once its
worker has left it (close_after_suite), so that it does not idle beside the groups that follow.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_api import pod
from finetune_trainer.env import omp_threads

# Where a suite writes its timings (tests/kind/conftest.py: <suite>-timings.json).
RESULTS = Path(__file__).resolve().parents[1] / "test-results"
SESSION_START = time.time()

# These suites (folders under tests/) are one xdist group each; other suites' modules are groups.
WHOLE_SUITES = ("kind", "controlplane")
SUITE_ORDER = ("kind", "controlplane", "trainer", "observability", "unit")

OPT_IN_MARKS = {
    "extended": "a longer variant of a capability `make test` proves (`make test-all` runs it)",
    "bench": "a measurement for `make bench`",
    "kueue": "needs Kueue built from source and installed (`make test-kueue`)",
}


def pytest_configure(config: pytest.Config) -> None:
    for mark, what in OPT_IN_MARKS.items():
        config.addinivalue_line("markers", f"{mark}: {what}; left out unless -m names it")
    # The tests that train in their own process (qlora, precision, the tasks' units) compute
    # with torch's OpenMP pool, one thread per core unless told. Under `make test` three xdist
    # workers share the cores, and a pool larger than a worker's share spins at every barrier on
    # threads that are not running: the qlora tests took 4.6x as long with 2 threads as with 1
    # on the loaded 2-core machine. So a worker takes its share, as a trainer's ranks do
    # (env.omp_threads), unless OMP_NUM_THREADS is set. This runs before any test module
    # imports torch, whose OpenMP runtime reads it once; the local pods that tests start get
    # one thread each anyway (testing.gang.offline_env).
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        os.environ.setdefault(pod.THREADS_ENV, omp_threads(worker["workercount"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the opt-in tests unless -m names their mark (as in `-m extended` or
    `-m "extended or not extended"`), and put the suites in SUITE_ORDER."""
    asked = config.option.markexpr or ""
    left_out = [m for m in OPT_IN_MARKS if m not in asked]
    skipped = [i for i in items if any(i.get_closest_marker(m) for m in left_out)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [i for i in items if i not in skipped]
    # Stable: each suite keeps its own order (test_faults compares with test_e2e's run before it).
    items.sort(key=lambda item: _suite_rank(_module_and_suite(item.nodeid)[1]))


def _suite_rank(suite: str) -> int:
    return SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)


def _module_and_suite(nodeid: str) -> tuple[str, str]:
    """`tests/<suite>/<module>.py::<name>` -> (`tests/<suite>/<module>.py`, `<suite>`)."""
    module = nodeid.split("::", 1)[0]
    parts = module.split("/")
    return module, parts[1] if len(parts) > 2 else ""


def group_of(nodeid: str) -> str:
    """The xdist group of a test: its suite if that is one of WHOLE_SUITES, else its module."""
    module, suite = _module_and_suite(nodeid)
    return suite if suite in WHOLE_SUITES else module


# suite -> what its session fixtures asked to run after this process's last test of it.
_SUITE_CLOSERS: dict[str, list[Callable[[], None]]] = {}


@pytest.fixture(scope="session")
def close_after_suite() -> Callable[[str, Callable[[], None]], None]:
    """`close_after_suite(suite, close)`: run `close` once this process has run the last test of
    `suite` (a folder under tests/) and torn down its module fixtures, not at the session's end.
    A cluster that a suite's session fixture stood up would otherwise idle on the machine's two
    cores while this worker runs the other suites' groups for minutes: the kind nodes took 6% of
    them, the local control plane about 2%."""

    def register(suite: str, close: Callable[[], None]) -> None:
        _SUITE_CLOSERS.setdefault(suite, []).append(close)

    return register


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    suite = _module_and_suite(item.nodeid)[1]
    if nextitem is not None and _module_and_suite(nextitem.nodeid)[1] == suite:
        return
    for close in _SUITE_CLOSERS.pop(suite, []):
        close()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `pytest -n N`: hand out whole groups (group_of), in collection order."""
    # Imported here: this hook is only called where xdist is installed.
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    # LoadScopeScheduling would otherwise put the groups with the most tests first.
    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the timings files the suites wrote in this session. A suite writes its own where its
    tests ran: under pytest-xdist that is a worker, whose terminal never shows, and only this
    conftest is loaded by the process that prints the summary."""
    if hasattr(terminalreporter.config, "workerinput"):
        return
    for path in sorted(RESULTS.glob("*-timings.json")):
        if path.stat().st_mtime < SESSION_START:
            continue
        name = path.name.removesuffix("-timings.json").replace("-", " ")
        terminalreporter.section(f"{name} timings (seconds)")
        for key, value in json.loads(path.read_text()).items():
            terminalreporter.write_line(f"{key:>40}: {value}")
