"""Observability tests: the chart's alerts, dashboard and monitors, checked with promtool and
against a real Prometheus scraping real exporters.

    python -m pytest -m observability tests/observability

promtool and prometheus come from Debian's `prometheus` package (hack/prometheus.sh installs it
when missing); helm, for the rendered PrometheusRule, from hack/helm.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import obs_helpers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "observability: alerts, dashboard and monitors (promtool, a real Prometheus)"
    )


@pytest.fixture(scope="session")
def promtool() -> str:
    return obs_helpers.promtool_binary()


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return obs_helpers.prometheus_binary()


@pytest.fixture(scope="session")
def helm() -> str:
    path = obs_helpers.helm_binary()
    if path is None:
        pytest.fail("no helm: neither $HELM, helm on PATH, nor hack/helm.sh (make prereqs)")
    return path
