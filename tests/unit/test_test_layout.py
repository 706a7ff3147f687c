"""The test tree itself: `make test` collects every suite in one pytest run, where two test
modules with the same basename collide ("import file mismatch") and stop the whole collection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert len(names) > 20  # the tree was found
    assert [n for n, count in names.items() if count > 1] == []
