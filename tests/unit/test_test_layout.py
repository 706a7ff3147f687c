"""The test tree itself: `make test` collects every suite in one pytest run, where two test
modules with the same basename collide ("import file mismatch") and stop the whole collection,
and hands the tests to two pytest-xdist workers in the groups tests/conftest.py makes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert len(names) > 20  # the tree was found
    assert [n for n, count in names.items() if count > 1] == []


def test_two_workers_keep_a_whole_suite_on_one_worker_in_order_and_start_it_first(
    tmp_path: Path,
) -> None:
    """tests/conftest.py's grouping, run by pytest-xdist on a tree of the same shape: the kind
    suite's tests share one worker and run in their order, and are handed out before the rest.
    What the suite's session fixture gave `close_after_suite` runs once, after its last test and
    before that worker's next test of another suite."""
    tree = tmp_path / "tests"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    tree.mkdir()
    (tree / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    log = tmp_path / "ran.log"
    record = (
        "import os, time\n"
        "def _ran(name):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(f\"{time.monotonic()} {os.environ['PYTEST_XDIST_WORKER']} {name}\\n\")\n"
        "    time.sleep(0.2)\n"
    )
    # More unit tests than the other worker gets through while the kind suite runs.
    unit = {f"unit/test_{m}.py": 3 for m in "abefg"}
    modules = {**unit, "kind/test_c.py": 3, "kind/test_d.py": 3}
    for module, count in modules.items():
        path = tree / module
        path.parent.mkdir(exist_ok=True)
        tests = "".join(f"def test_{i}():\n    _ran('{module}::{i}')\n" for i in range(count))
        path.write_text(record + tests)
    (tree / "kind" / "conftest.py").write_text(
        record + "import pytest\n"
        "@pytest.fixture(scope='session', autouse=True)\n"
        "def cluster(close_after_suite):\n"
        "    close_after_suite('kind', lambda: _ran('closed'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", "tests"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # (start time, worker, test), in the order the tests started
    ran = sorted((line.split() for line in log.read_text().splitlines()), key=lambda f: float(f[0]))
    kind = [(worker, name) for _, worker, name in ran if name.startswith("kind/")]
    assert len({worker for worker, _ in kind}) == 1
    assert [name for _, name in kind] == [f"kind/test_{m}.py::{i}" for m in "cd" for i in range(3)]
    # Handed out first: the worker that ran the kind suite ran nothing before it.
    first_on_kind_worker = next(name for _, worker, name in ran if worker == kind[0][0])
    assert first_on_kind_worker == "kind/test_c.py::0"
    # The other modules are groups of their own: the other worker took them meanwhile.
    assert {worker for _, worker, name in ran if name.startswith("unit/")} - {kind[0][0]}
    on_kind_worker = [name for _, worker, name in ran if worker == kind[0][0]]
    assert on_kind_worker.count("closed") == 1
    closed = on_kind_worker.index("closed")
    assert on_kind_worker[closed - 1] == "kind/test_d.py::2"
    assert on_kind_worker[closed + 1].startswith("unit/"), on_kind_worker
