"""What every suite shares: the marks that leave a test out of `make test` unless -m names them.

`make test` is the tier CI runs on every change: each capability proven once, on real parts. The
opt-in marks hold what it leaves out:

- `extended`: a longer variant of what that tier already proves (another task's run through the
  same launcher, the same fault on another path). `make test-all` runs it with everything else.
- `bench`: a measurement (`make bench`), not a check.
- `kueue`: the run against the real Kueue controller (`make test-kueue`), whose first build of
  Kueue takes minutes.
"""

from __future__ import annotations

import pytest

OPT_IN_MARKS = {
    "extended": "a longer variant of a capability `make test` proves (`make test-all` runs it)",
    "bench": "a measurement for `make bench`",
    "kueue": "needs Kueue built from source and installed (`make test-kueue`)",
}


def pytest_configure(config: pytest.Config) -> None:
    for mark, what in OPT_IN_MARKS.items():
        config.addinivalue_line("markers", f"{mark}: {what}; left out unless -m names it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the opt-in tests unless -m names their mark (as in `-m extended` or
    `-m "extended or not extended"`)."""
    asked = config.option.markexpr or ""
    left_out = [m for m in OPT_IN_MARKS if m not in asked]
    skipped = [i for i in items if any(i.get_closest_marker(m) for m in left_out)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [i for i in items if i not in skipped]
