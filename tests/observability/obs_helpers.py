"""Helpers of the observability tests: the chart's monitoring files, PromQL in the dashboard,
the chart rendered with helm, a real
Prometheus process, and its HTTP API.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from finetune_trainer.testing.gang import free_ports

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
RULES_FILE = CHART / "rules" / "finetune-alerts.yaml"
DASHBOARD_FILE = CHART / "dashboards" / "finetune-operator.json"
RULES_TEST_FILE = Path(__file__).resolve().parent / "rules_test.yaml"
ALERTS_DOC = REPO / "docs" / "alerts.md"
RESULTS_DIR = REPO / "test-results" / "dashboards"

# What the live test substitutes for Grafana's variables: every namespace, job and rank, and
# windows that fit a history of tens of seconds scraped every second.
RATE_INTERVAL = "5s"


# ---------------------------------------------------------------- binaries


def _which_or_install(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    out = subprocess.run(
        [str(REPO / "hack" / "prometheus.sh")], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"hack/prometheus.sh failed:\n{out.stderr}")
    paths = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    return paths[name]


def promtool_binary() -> str:
    return _which_or_install("promtool")


def prometheus_binary() -> str:
    return _which_or_install("prometheus")


def helm_binary() -> str | None:
    """helm from $HELM, PATH or hack/helm.sh (which builds it once into the cache); None if
    there is no way to get it."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    if shutil.which("helm"):
        return shutil.which("helm")
    script = REPO / "hack" / "helm.sh"
    if not script.exists():
        return None
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"hack/helm.sh failed:\n{out.stderr[-4000:]}")
    return out.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- files


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES_FILE.read_text())


def alert_rules(groups: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    doc = groups if groups is not None else load_rules()
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, rows' nested panels included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict, dict]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """name -> label_values(...) query of each query variable."""
    out = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out[var["name"]] = q["query"] if isinstance(q, dict) else q
    return out


METRIC_RE = re.compile(r"\b(finetune_[a-z0-9_]+)\b")


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def substitute(expr: str, range_s: int) -> str:
    """Grafana's variables as the live test evaluates them: all clusters, namespaces, jobs,
    attempts and ranks."""
    values = {
        # All, as Grafana sends it (allValue): series without the label match too.
        "cluster": ".*",
        "attempt": ".*",
        "namespace": ".*",
        "finetunejob": ".+",
        "rank": ".+",
        "__rate_interval": RATE_INTERVAL,
        "__interval": "1s",
        "__range": f"{range_s}s",
    }
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(r"\$" + re.escape(name) + r"\b", value, expr)
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unsubstituted variables {leftover} in {expr}"
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


# ---------------------------------------------------------------- chart rendering


def helm_template(helm: str, values: dict[str, Any], show_only: list[str]) -> list[dict]:
    """`helm template` of the chart with `values`, only the given templates, as objects."""
    args = [helm, "template", "obs", str(CHART), "--namespace", "monitoring"]
    for template in show_only:
        args += ["--show-only", f"templates/{template}"]
    out = subprocess.run(
        [*args, "--values", "-"],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise AssertionError(f"helm template failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def relabelings_to_config(relabelings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus Operator relabelings (camelCase) -> Prometheus relabel_configs."""
    return [{_snake(k): v for k, v in r.items()} for r in relabelings or []]


def _job_relabeling(monitor: dict[str, Any]) -> dict[str, Any]:
    """How the Prometheus Operator sets `job` when a monitor has no jobLabel: a
    ServiceMonitor's targets get the Service's name, a PodMonitor's `<namespace>/<name>`."""
    assert not monitor["spec"].get("jobLabel"), "jobLabel is not emulated"
    if monitor["kind"] == "ServiceMonitor":
        return {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"}
    meta = monitor["metadata"]
    return {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"}


def scrape_job_from_monitor(
    monitor: dict[str, Any],
    targets: list[str],
    interval: str,
    discovered: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The scrape job the Prometheus Operator generates for the first endpoint of a PodMonitor
    or ServiceMonitor, with static targets instead of Kubernetes service discovery.

    `discovered` stands in for the `__meta_kubernetes_*` labels service discovery would give
    the targets (e.g. the Service's name, the pods' labels), so that the job label and the
    monitor's own relabelings work on them as they would in a cluster.
    """
    kind = monitor["kind"]
    spec = monitor["spec"]
    endpoint = (spec.get("podMetricsEndpoints") or spec.get("endpoints"))[0]
    prefix = "podMonitor" if kind == "PodMonitor" else "serviceMonitor"
    meta = monitor["metadata"]
    static: dict[str, Any] = {"targets": targets}
    if discovered:
        static["labels"] = dict(discovered)
    return {
        "job_name": f"{prefix}/{meta['namespace']}/{meta['name']}/0",
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "static_configs": [static],
        "relabel_configs": [
            _job_relabeling(monitor),
            *relabelings_to_config(endpoint.get("relabelings")),
        ],
    }


# ---------------------------------------------------------------- a real Prometheus


class Prometheus:
    """A `prometheus` process on 127.0.0.1 with its own storage, stopped by stop()."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        # Below the ephemeral range, as the gangs' ports are (testing.gang.free_ports).
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.log.close()

    # ---- HTTP API

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def instant(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step
        )
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """Every finite sample value of an instant (vector) or range (matrix) result."""
    out = []
    for series in result:
        samples = series.get("values") or [series["value"]]
        out += [float(v) for _, v in samples if math.isfinite(float(v))]
    return out


def grafana_label_values(query: str) -> tuple[str, str]:
    """`label_values(selector, label)` -> (label, selector)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    assert m, f"not a label_values(selector, label) query: {query}"
    return m.group(2), m.group(1)
