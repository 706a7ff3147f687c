"""The alert rules: promtool checks the rule file and the chart's rendered PrometheusRule, runs
the unit tests in rules_test.yaml, and every alert carries what an on-call person needs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from obs_helpers import (
    ALERTS_DOC,
    RULES_FILE,
    RULES_TEST_FILE,
    alert_rules,
    helm_template,
    load_rules,
)

pytestmark = pytest.mark.observability

RUNBOOK_BASE = "https://github.com/finetune-operator/finetune-operator/blob/main/docs/alerts.md#"
SEVERITIES = {"critical", "warning", "info"}
ALERTS = [r["alert"] for r in alert_rules()]


def run(args: list[str], cwd: Path | None = None) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_promtool_check_rules(promtool: str) -> None:
    out = run([promtool, "check", "rules", str(RULES_FILE)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_promtool_unit_tests(promtool: str) -> None:
    # rules_test.yaml names the rule file relative to itself.
    run([promtool, "test", "rules", RULES_TEST_FILE.name], cwd=RULES_TEST_FILE.parent)


def test_the_expected_alerts_exist() -> None:
    assert set(ALERTS) == {
        "FineTuneJobFailed",
        "FineTuneJobStalled",
        "FineTuneJobLossNaN",
        "FineTuneJobLossRising",
        "FineTuneJobCheckpointStoreFull",
        "FineTuneJobStopOutlastsGracePeriod",
        "FineTuneJobEvaluationGateFailed",
        "FineTuneJobRestartedRepeatedly",
        "FineTuneJobStuckPending",
        "FineTuneCheckpointClaimRetained",
        "FineTuneOperatorDown",
        "FineTuneOperatorReconcileErrors",
    }
    assert len(ALERTS) == len(set(ALERTS)), "duplicate alert names"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_has_severity_annotations_and_runbook(alert: str) -> None:
    rule = next(r for r in alert_rules() if r["alert"] == alert)
    assert rule["labels"]["severity"] in SEVERITIES
    ann = rule["annotations"]
    assert ann["summary"].strip() and ann["description"].strip()
    assert ann["runbook_url"] == RUNBOOK_BASE + alert.lower()
    doc = ALERTS_DOC.read_text()
    # GitHub's anchor of "## FineTuneJobStalled" is "#finetunejobstalled".
    assert re.search(rf"^## {alert}$", doc, re.M), f"docs/alerts.md has no '## {alert}' section"
    section = doc.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
    for part in ("Meaning", "Likely causes", "What to check", "How to fix"):
        assert part in section, f"the runbook of {alert} lacks '{part}'"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_is_unit_tested_firing_and_silent(alert: str) -> None:
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == alert]
    assert any(c.get("exp_alerts") for c in cases), f"no test where {alert} fires"
    assert any(not c.get("exp_alerts") for c in cases), f"no test where {alert} stays silent"


def test_trainer_reports_the_status_the_stall_alert_reads() -> None:
    train = (RULES_FILE.parents[3] / "trainer" / "finetune_trainer" / "train.py").read_text()
    stalled = next(r for r in alert_rules() if r["alert"] == "FineTuneJobStalled")
    (status,) = re.findall(r'finetune_trainer_status\{status="(\w+)"\}', stalled["expr"])
    assert f'set_status("{status}")' in train


def _render(helm: str, **rule_values: object) -> list[dict]:
    values = {
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "kube-prometheus"},
                **rule_values,
            }
        },
        "metrics": {"service": {"enabled": True}},
    }
    return helm_template(helm, values, ["prometheusrule.yaml", "service.yaml"])


def _render_rule(helm: str, **rule_values: object) -> dict:
    docs = [d for d in _render(helm, **rule_values) if d["kind"] == "PrometheusRule"]
    assert len(docs) == 1
    return docs[0]


def _alert(groups: dict, name: str) -> dict:
    return next(r for r in alert_rules(groups) if r["alert"] == name)


# Alerts whose rendering the per-job and operator-wide tests below need to tell apart.
JOB_ALERTS = [
    "FineTuneJobFailed",
    "FineTuneJobEvaluationGateFailed",
    "FineTuneJobRestartedRepeatedly",
    "FineTuneJobStuckPending",
]


@pytest.mark.parametrize("alert", JOB_ALERTS)
def test_job_alerts_name_the_job(alert: str) -> None:
    """Each per-job alert aggregates to (namespace, finetunejob), from the operator's per-job
    series, and its summary names the job."""
    rule = _alert(load_rules(), alert)
    (by,) = re.findall(r"by \(([^)]*)\)", rule["expr"])
    assert {"namespace", "finetunejob"} <= {x.strip() for x in by.split(",")}
    assert re.search(r"finetune_operator_job_(status|attempt)\b", rule["expr"])
    assert "{{ $labels.namespace }}/{{ $labels.finetunejob }}" in rule["annotations"]["summary"]


def test_rendered_prometheusrule_passes_promtool(helm: str, promtool: str, tmp_path: Path) -> None:
    base = "https://runbooks.example.com/finetune/"
    rule = _render_rule(
        helm,
        stalledMinutes=25,
        pendingMinutes=7,
        retainedClaimDays=30,
        operatorJob="platform/finetune-operator",
        runbookBaseURL=base,
    )
    assert rule["kind"] == "PrometheusRule"
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    spec_file = tmp_path / "rendered-rules.yaml"
    spec_file.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    out = run([promtool, "check", "rules", str(spec_file)])
    assert f"SUCCESS: {len(ALERTS)} rules found" in out
    # The spec is the rule file with only the configurable parts changed: undo each change
    # and the file is what remains.
    source = load_rules()
    rendered = rule["spec"]
    stalled = _alert(rendered, "FineTuneJobStalled")
    assert "> 25 * 60" in stalled["expr"] and "10 * 60" not in stalled["expr"]
    stalled["expr"] = stalled["expr"].replace("25 * 60", "10 * 60")
    pending = _alert(rendered, "FineTuneJobStuckPending")
    assert pending["for"] == "7m"
    pending["for"] = "15m"
    retained = _alert(rendered, "FineTuneCheckpointClaimRetained")
    assert "> 30 * 86400" in retained["expr"] and "7 * 86400" not in retained["expr"]
    retained["expr"] = retained["expr"].replace("30 * 86400", "7 * 86400")
    down = _alert(rendered, "FineTuneOperatorDown")
    assert 'finetune_operator_leader{job="platform/finetune-operator"} == 1' in down["expr"]
    down["expr"] = down["expr"].replace("platform/finetune-operator", "finetune-operator-metrics")
    for alert in alert_rules(rendered):
        assert alert["annotations"]["runbook_url"] == base + alert["alert"].lower()
        alert["annotations"]["runbook_url"] = RUNBOOK_BASE + alert["alert"].lower()
    assert rendered == source
    # Annotation templates reach Prometheus untouched by helm.
    assert "{{ $labels.finetunejob }}" in yaml.safe_dump(rendered)
    assert "| query }}" in _alert(rendered, "FineTuneJobStuckPending")["annotations"]["description"]


def test_rendered_prometheusrule_defaults_match_values_and_the_file(helm: str) -> None:
    values = yaml.safe_load((RULES_FILE.parents[1] / "values.yaml").read_text())
    defaults = values["monitoring"]["prometheusRule"]
    docs = _render(helm)
    rendered = next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]
    stalled = _alert(rendered, "FineTuneJobStalled")
    assert f"> {defaults['stalledMinutes']} * 60" in stalled["expr"]
    assert _alert(rendered, "FineTuneJobStuckPending")["for"] == f"{defaults['pendingMinutes']}m"
    # The unit tests run the file as is: its thresholds are the chart's defaults.
    source = load_rules()
    assert "> 10 * 60" in _alert(source, "FineTuneJobStalled")["expr"]
    assert defaults["stalledMinutes"] == 10
    assert _alert(source, "FineTuneJobStuckPending")["for"] == f"{defaults['pendingMinutes']}m"
    days = f"> {defaults['retainedClaimDays']} * 86400"
    assert days in _alert(rendered, "FineTuneCheckpointClaimRetained")["expr"]
    assert days in _alert(source, "FineTuneCheckpointClaimRetained")["expr"]
    # With no operatorJob, the down alert watches the job the ServiceMonitor's targets get:
    # the Prometheus Operator names it after the Service it scrapes.
    (service,) = [d for d in docs if d["kind"] == "Service"]
    name = service["metadata"]["name"]
    down = _alert(rendered, "FineTuneOperatorDown")["expr"]
    assert f'finetune_operator_leader{{job="{name}"}} == 1' in down
    # <release>-finetune-operator-metrics; a release named finetune-operator is the fullname
    # alone, which gives the file's own job name.
    assert name == "obs-finetune-operator-metrics"
    assert 'job="finetune-operator-metrics"' in _alert(source, "FineTuneOperatorDown")["expr"]
    # No runbookBaseURL: the project's docs, as in the file.
    assert defaults["runbookBaseURL"] == ""
    for alert in alert_rules(rendered):
        assert alert["annotations"]["runbook_url"] == RUNBOOK_BASE + alert["alert"].lower()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("runbookBaseURL", "ftp://example.com/"),
        ("operatorJob", 'evil"} or vector(1)'),
        ("pendingMinutes", 0),
        ("retainedClaimDays", 0),
    ],
)
def test_values_schema_refuses_bad_rule_settings(helm: str, key: str, value: object) -> None:
    with pytest.raises(AssertionError, match=key):
        _render(helm, **{key: value})
