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
        "FineTuneJobEvaluationGateFailed",
        "FineTuneJobRestartedRepeatedly",
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


def _render_rule(helm: str, stalled_minutes: int) -> dict:
    values = {
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "stalledMinutes": stalled_minutes,
                "labels": {"release": "kube-prometheus"},
            }
        }
    }
    docs = helm_template(helm, values, ["prometheusrule.yaml"])
    assert len(docs) == 1
    return docs[0]


def test_rendered_prometheusrule_passes_promtool(helm: str, promtool: str, tmp_path: Path) -> None:
    rule = _render_rule(helm, stalled_minutes=25)
    assert rule["kind"] == "PrometheusRule"
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    spec_file = tmp_path / "rendered-rules.yaml"
    spec_file.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    out = run([promtool, "check", "rules", str(spec_file)])
    assert f"SUCCESS: {len(ALERTS)} rules found" in out
    # The spec is the rule file, with only the stall threshold changed.
    source = load_rules()
    rendered = rule["spec"]
    stalled = next(r for r in alert_rules(rendered) if r["alert"] == "FineTuneJobStalled")
    assert "> 25 * 60" in stalled["expr"] and "10 * 60" not in stalled["expr"]
    stalled["expr"] = stalled["expr"].replace("25 * 60", "10 * 60")
    assert rendered == source
    # Annotation templates reach Prometheus untouched by helm.
    assert "{{ $labels.finetunejob }}" in yaml.safe_dump(rendered)


def test_rendered_prometheusrule_default_threshold_matches_values(helm: str) -> None:
    values = yaml.safe_load((RULES_FILE.parents[1] / "values.yaml").read_text())
    default = values["monitoring"]["prometheusRule"]["stalledMinutes"]
    rendered = _render_rule(helm, stalled_minutes=default)["spec"]
    stalled = next(r for r in alert_rules(rendered) if r["alert"] == "FineTuneJobStalled")
    assert f"> {default} * 60" in stalled["expr"]
    # The unit tests run the file as is: its threshold is the chart's default.
    assert "> 10 * 60" in RULES_FILE.read_text() and default == 10
