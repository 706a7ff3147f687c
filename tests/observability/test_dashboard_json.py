"""The Grafana dashboard, without Grafana: its shape, its variables, PromQL that parses, and
metric names that the trainer and operator code really export."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from obs_helpers import (
    REPO,
    alert_rules,
    dashboard_targets,
    load_dashboard,
    metric_names,
    panels,
    substitute,
    variable_queries,
)
from prometheus_client import CollectorRegistry

from finetune_api import phases

pytestmark = pytest.mark.observability

DASHBOARD = load_dashboard()
BUILTIN_VARS = {"__rate_interval", "__interval", "__range"}


def exported_sample_names() -> set[str]:
    """Every sample name the trainer's and the operator's metrics classes expose."""
    from finetune_operator.metrics import OperatorMetrics
    from finetune_trainer.telemetry import TrainerMetrics

    registries = [CollectorRegistry(), CollectorRegistry()]
    TrainerMetrics("job", "ns", 0, registry=registries[0], process_metrics=False)
    OperatorMetrics(registry=registries[1])
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["_sum", "_count"],
        "gauge": [""],
        "info": ["_info"],
    }
    names = set()
    for registry in registries:
        for family in registry.collect():
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def used_metric_names() -> set[str]:
    used = set()
    for _, target in dashboard_targets(DASHBOARD):
        used |= metric_names(target["expr"])
    for query in variable_queries(DASHBOARD).values():
        used |= metric_names(query)
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    return used


def test_identity_and_datasource_variable() -> None:
    assert DASHBOARD["uid"] == "finetune-operator"
    assert DASHBOARD["title"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("cluster", "namespace", "finetunejob", "attempt", "rank"):
        var = variables[name]
        assert var["type"] == "query" and var["includeAll"]
        # All matches series that lack the label too (a single cluster has no `cluster`).
        assert var["allValue"] == ".*"
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        # A plain string: every Grafana version reads it (10+ converts it on first edit).
        assert var["query"] == var["definition"] and var["query"].startswith("label_values(")
        # One cluster at a time (or All); any number of the others.
        assert var["multi"] is (name != "cluster")


def test_variables_cascade_in_order() -> None:
    """Each variable's query narrows by the variables before it, and only by those."""
    order = [v["name"] for v in DASHBOARD["templating"]["list"]]
    assert order == ["datasource", "cluster", "namespace", "finetunejob", "attempt", "rank"]
    queries = variable_queries(DASHBOARD)
    for i, name in enumerate(order[1:], start=1):
        used = set(re.findall(r"\$\{?(\w+)", queries[name]))
        assert used == set(order[1:i]), name


SELECTOR = re.compile(r"\b(finetune_[a-z0-9_]+|process_start_time_seconds)\b(\{[^}]*\})?")


def test_every_selector_filters_by_cluster_and_trainer_series_by_attempt() -> None:
    """`cluster` narrows every series of every query; `attempt` every trainer series (the
    operator's carry no attempt: they outlive a gang)."""
    for panel, target in dashboard_targets(DASHBOARD):
        for name, selector in SELECTOR.findall(target["expr"]):
            where = (panel["title"], name)
            assert 'cluster=~"$cluster"' in selector, where
            trainer = not name.startswith(("finetune_operator_", "process_"))
            assert ('attempt=~"$attempt"' in selector) is trainer, where
            if trainer:
                assert 'finetunejob=~"$finetunejob"' in selector, where


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in panels(DASHBOARD):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panel_ids_unique_and_layout_does_not_overlap() -> None:
    everything = DASHBOARD["panels"]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in everything:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_only_defined_variables_are_used() -> None:
    defined = {v["name"] for v in DASHBOARD["templating"]["list"]} | BUILTIN_VARS
    texts = [t["expr"] for _, t in dashboard_targets(DASHBOARD)]
    texts += list(variable_queries(DASHBOARD).values())
    for text in texts:
        for name in re.findall(r"\$\{?(\w+)", text):
            assert name in defined, f"${name} in {text}"


def test_rates_use_grafana_windows() -> None:
    """Windows are $__rate_interval (or $__range for totals), never hard-coded."""
    for panel, target in dashboard_targets(DASHBOARD):
        for window in re.findall(r"\[([^\]]+)\]", target["expr"]):
            assert window in ("$__rate_interval", "$__range"), (panel["title"], window)


def test_the_issue_panels_exist() -> None:
    exprs = "\n".join(t["expr"] for _, t in dashboard_targets(DASHBOARD))
    for needle in [
        "finetune_operator_jobs",
        "finetune_train_loss",
        "finetune_train_learning_rate",
        "finetune_train_tokens_per_second",
        "rate(finetune_train_tokens_total",
        "histogram_quantile(0.5, sum by (cluster, namespace, finetunejob, le) "
        "(rate(finetune_train_step_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (cluster, namespace, finetunejob, le) "
        "(rate(finetune_train_step_duration_seconds_bucket",
        'stage="before"',
        'stage="after"',
        "finetune_startup_phase_timestamp_seconds",
        "finetune_checkpoint_save_duration_seconds",
        "finetune_accelerator_memory_peak_bytes",
        "histogram_quantile(0.99, sum by (le) "
        "(rate(finetune_operator_reconcile_duration_seconds_bucket",
        "rate(finetune_operator_reconcile_errors_total",
        "finetune_operator_job_restarts_total",
        # the per-job table: phase, reason and attempt of each job
        "max by (cluster, namespace, finetunejob, phase, reason) (finetune_operator_job_status{",
        "max by (cluster, namespace, finetunejob) (finetune_operator_job_attempt{",
        # the kept checkpoint claims: size and age of each, by claim
        "max by (cluster, namespace, persistentvolumeclaim, finetunejob) "
        "(finetune_operator_retained_claim_bytes{",
        "time() - max by (cluster, namespace, persistentvolumeclaim, finetunejob) "
        "(finetune_operator_retained_claim_timestamp_seconds{",
    ]:
        assert needle in exprs, needle


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule's expression."""
    rules = [
        {
            "record": f"dashboard:panel_{panel['id']}:{target['refId']}",
            "expr": substitute(target["expr"], range_s=60),
        }
        for panel, target in dashboard_targets(DASHBOARD)
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_used_metrics_exist_in_code() -> None:
    missing = used_metric_names() - exported_sample_names()
    assert not missing, f"the dashboard or alerts use metrics the code does not export: {missing}"


def _phase_name(node: ast.expr) -> str | None:
    """A phase as train.py names it: a literal, or a finetune_api.phases constant."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.Attribute):
        return getattr(phases, node.attr, None)
    return None


def test_startup_breakdown_follows_the_trainer_phase_order() -> None:
    """The time-to-first-step segments chain the phases in the order train.py records them."""
    tree = ast.parse((REPO / "trainer" / "finetune_trainer" / "train.py").read_text())
    calls = [
        (node.lineno, _phase_name(node.args[0]))
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "record_phase"
        and node.args
    ]
    # The phases after the last step are not in this panel, nor the download, which only hf://
    # sources have (a bar that most jobs would leave empty): its time is in "load data", and
    # status.startup tells it apart.
    calls = [
        (line, name) for line, name in calls if name in phases.STARTUP and name != phases.DOWNLOADED
    ]
    # process_started is stamped by TrainerMetrics() and first_step by the first record_step.
    trainer_order = ["process_started", *[p for _, p in sorted(calls)], "first_step"]
    panel = next(p for p in panels(DASHBOARD) if p["title"].startswith("Time to first step, by"))
    chain: list[str] = []
    for target in panel["targets"]:
        found = re.findall(r'phase="(\w+)"', target["expr"])
        if "process_start_time_seconds" in target["expr"]:  # the process itself starting
            (later,), earlier = found, "process_start"
        else:
            later, earlier = found
        if not chain:
            chain.append(earlier)
        assert chain[-1] == earlier, f"segments do not chain: {chain} then {earlier}->{later}"
        chain.append(later)
    assert chain == ["process_start", *trainer_order]


def test_per_job_aggregations_keep_jobs_of_different_clusters_apart() -> None:
    """With cluster All, two clusters' jobs of the same namespace and name stay two series."""
    for panel, target in dashboard_targets(DASHBOARD):
        for by in re.findall(r"by \(([^)]*)\)", target["expr"]):
            labels = {x.strip() for x in by.split(",")}
            if "finetunejob" in labels:
                assert "cluster" in labels, (panel["title"], by)


def test_job_table_joins_status_and_attempt_per_job() -> None:
    (table,) = [p for p in panels(DASHBOARD) if p["title"].startswith("FineTuneJobs: phase")]
    assert [t["format"] for t in table["targets"]] == ["table", "table"]
    assert all(t["instant"] and not t["range"] for t in table["targets"])
    assert [t["id"] for t in table["transformations"]] == ["merge", "organize"]
    # The columns are the labels the alerts that name a job use.
    status = table["targets"][0]["expr"]
    assert "finetune_operator_job_status" in status
    for label in ("namespace", "finetunejob", "phase", "reason"):
        assert label in status.split("(")[1], label
