"""Live: a real Prometheus scrapes a real training job of this project's trainer (two pods, each
a `finetune train` process with a pod's env, on a tiny model built here) and the operator's
metrics, with scrape jobs derived from the chart's PodMonitor and ServiceMonitor and
the chart's alert rules loaded. Every query of the dashboard must return data, the loss must be
sampled once per scrape with the expected labels, no alert may fire on the healthy run, and
the main panels are drawn to test-results/dashboards/*.png for a person to look at.

The operator's metrics object is driven the way reconcile.py drives it (each pass's status,
attempts, the time to Running, and reconcile passes timed around the operator's real render
functions), and as its claim watch does (the claim a failed job left); a real operator needs
a cluster, which tests/controlplane has. The rules are the PrometheusRule that helm renders,
and the targets get the job label and the pod labels that the Prometheus Operator and
Kubernetes service discovery would give them, so that the chart's alerts meet the labels they
would meet in a cluster.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from obs_helpers import (
    RESULTS_DIR,
    Prometheus,
    alert_rules,
    chart_values,
    dashboard_targets,
    finite_values,
    grafana_label_values,
    helm_binary,
    helm_template,
    legend,
    load_dashboard,
    panels,
    scrape_job_from_monitor,
    substitute,
    variable_queries,
)
from prometheus_client import CollectorRegistry, start_http_server
from real_training import RealRun

from finetune_api.constants import LABEL_ATTEMPT
from finetune_api.pod import GRACE_PERIOD_GAUGE, STOP_SECONDS_GAUGE
from finetune_trainer.testing.tiny import causal_job, save_test_llama, save_test_text

pytestmark = pytest.mark.observability

T = TypeVar("T")
SCRAPE_INTERVAL_S = 1
DASHBOARD = load_dashboard()
TARGETS = list(dashboard_targets(DASHBOARD))


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Live:
    prom: Prometheus
    namespace: str
    job: str
    trainer_targets: list[str]
    start: float  # first scrape (unix time)
    end: float  # when the queries are evaluated
    run: RealRun
    training_started: float  # unix time of the first step
    training_ended: float  # unix time of the last step
    trainer_job: str  # the job label of the trainer targets
    operator_job: str  # the job label of the operator's target

    @property
    def range_s(self) -> int:
        # A few seconds before the first scrape after start, so windows see counters at 0.
        return max(int(self.end - self.start) + 3, 10)


# The pod label the PodMonitor's attempt relabeling reads, as service discovery names it.
ATTEMPT_META = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", LABEL_ATTEMPT)
OTHER_JOB = "restarted-once"


def _chart_objects() -> dict[str, dict[str, Any]]:
    """The chart's PodMonitor, ServiceMonitor, metrics Service and PrometheusRule, as
    `helm template` renders them with monitoring on."""
    values = chart_values()
    for key in ("podMonitor", "serviceMonitor", "prometheusRule"):
        values["monitoring"][key]["enabled"] = True
    helm = helm_binary()
    assert helm, "no helm: neither $HELM, helm on PATH, nor hack/helm.sh (make prereqs)"
    templates = ["podmonitor.yaml", "servicemonitor.yaml", "service.yaml", "prometheusrule.yaml"]
    return {d["kind"]: d for d in helm_template(helm, values, templates)}


def job_status(phase: str, reason: str, attempts: int) -> dict[str, Any]:
    """A status as the operator writes it: the phase, the condition behind it, the attempts."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    running = phase == "Running"
    conditions = [
        {"type": "Running", "status": str(running), "reason": reason, "lastTransitionTime": now}
    ]
    status: dict[str, Any] = {"phase": phase, "attempts": attempts, "conditions": conditions}
    if phase in ("Succeeded", "Failed"):
        conditions.append(
            {"type": phase, "status": "True", "reason": reason, "lastTransitionTime": now}
        )
        status["completionTime"] = now
    return status


def kept_claim(namespace: str, job: str) -> dict[str, Any]:
    """The checkpoint claim of a failed job, as the operator's claim watch sees it once the
    operator has released it (claimRetentionPolicy.whenFailed: Retain)."""
    from finetune_operator import checkpoints, naming

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    marks = checkpoints.retention_marks("uid-of-the-failed-job", now)
    name = f"{job}-checkpoints"
    labels = {**naming.child_labels(job), **marks["labels"]}
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": labels,
            "annotations": marks["annotations"],
        },
        "spec": {"resources": {"requests": {"storage": "30Gi"}}},
        "status": {"phase": "Bound", "capacity": {"storage": "30Gi"}},
    }


class OperatorDriver(threading.Thread):
    """Calls OperatorMetrics as reconcile.py does, every half second, until stopped."""

    def __init__(self, metrics: Any, namespace: str, job: str, run: RealRun) -> None:
        super().__init__(daemon=True, name="operator-metrics")
        self.metrics, self.namespace, self.job, self.run_ = metrics, namespace, job, run
        self.stop_event = threading.Event()
        # A thread's exception is only printed; the fixture asserts this stayed None.
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._drive()
        except BaseException as exc:
            self.error = exc
            raise

    def _drive(self) -> None:
        from finetune_api.validation import load_manifest
        from finetune_operator.checkpoints import retained_claim
        from finetune_operator.render import render_manifests
        from finetune_operator.settings import Settings

        examples = Path(__file__).resolve().parents[2] / "trainer" / "finetune_trainer" / "examples"
        manifest = load_manifest(sorted(examples.glob("*.yaml"))[0])
        m = self.metrics
        created = time.monotonic()
        key, other = (self.namespace, self.job), (self.namespace, OTHER_JOB)
        m.observe_job(other, job_status("Running", "PodsRunning", 1))
        m.job_attempts.inc()  # our job's first attempt
        running = restarted = failed = False
        while not self.stop_event.is_set():
            started = time.perf_counter()
            render_manifests(manifest, Settings())  # a reconcile pass's pure part
            step = self.run_.scrape(0, "finetune_train_step") or 0
            total = self.run_.doc["spec"]["training"]["maxSteps"]
            if not restarted and step >= 0.3 * total:
                restarted = True  # the other job's gang fails once and is re-created ...
                m.job_attempts.inc()
                m.restarts.labels(cause="failure").inc()
                m.observe_job(other, job_status("Pending", "Restarting", 2))
            if restarted and not failed and step >= 0.6 * total:
                failed = True  # ... then runs out of restarts, and its claim is kept
                m.jobs_failed.labels(reason="BackoffLimitExceeded").inc()
                m.observe_job(other, job_status("Failed", "BackoffLimitExceeded", 2))
                claim = kept_claim(self.namespace, OTHER_JOB)
                m.observe_claim((self.namespace, claim["metadata"]["name"]), retained_claim(claim))
            if not running and step:
                running = True
                m.time_to_running.observe(time.monotonic() - created)
            if self.run_.finished():
                m.observe_job(key, job_status("Succeeded", "PushedToHub", 1))
            elif running:
                m.observe_job(key, job_status("Running", "PodsRunning", 1))
            else:
                m.observe_job(key, job_status("Pending", "PodsPending", 1))
            m.reconcile_duration.observe(time.perf_counter() - started)
            self.stop_event.wait(0.5)


MAX_STEPS = 700  # about 15-25 s of training on two busy cores


def _last_sample_time(prom: Prometheus, selector: str) -> float:
    """The time of the newest raw sample of every series of selector, the earliest of them."""
    series = prom.instant(f"{selector}[10m]")
    return min(float(s["values"][-1][0]) for s in series)


@pytest.fixture(scope="module")
def live(prometheus_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from finetune_operator.metrics import OperatorMetrics

    workdir = tmp_path_factory.mktemp("live")
    namespace, job = f"obs-{secrets.token_hex(3)}", "tiny-lm"
    doc = causal_job(
        save_test_llama(workdir / "tiny-llama"),
        save_test_text(workdir / "text.jsonl"),
        name=job,
        namespace=namespace,
        max_steps=MAX_STEPS,
        checkpoint_every=max(1, MAX_STEPS // 3),
    )
    run = RealRun(workdir, doc)
    operator = OperatorMetrics(registry=CollectorRegistry())
    operator.leader.set(1)  # as main.py sets it once it holds the Lease
    op_server, _ = start_http_server(0, addr="127.0.0.1", registry=operator.registry)
    trainer_targets = run.targets

    chart = _chart_objects()
    rules_file = workdir / "prometheusrule-spec.yaml"
    rules_file.write_text(yaml.safe_dump(chart["PrometheusRule"]["spec"], sort_keys=False))
    pod_monitor = chart["PodMonitor"]
    trainer_job = f"{pod_monitor['metadata']['namespace']}/{pod_monitor['metadata']['name']}"
    interval = f"{SCRAPE_INTERVAL_S}s"
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            # Both pods run the gang's first attempt.
            scrape_job_from_monitor(pod_monitor, trainer_targets, interval, {ATTEMPT_META: "1"}),
            scrape_job_from_monitor(
                chart["ServiceMonitor"],
                [f"127.0.0.1:{op_server.server_port}"],
                interval,
                {"__meta_kubernetes_service_name": chart["Service"]["metadata"]["name"]},
            ),
        ],
    }
    driver = OperatorDriver(operator, namespace, job, run)
    prom = Prometheus(prometheus_bin, workdir / "prometheus", config)
    try:
        prom.wait_ready()
        run.start()
        # Every target scraped once before training starts: the trainer's exporter is up (and
        # its counters at 0) long before the first step, so counters start at 0 in the TSDB.
        wait_until(lambda: len(prom.instant("up == 1")) == 3, 120, "the first scrape of 3 targets")
        start = time.time()
        driver.start()
        codes = run.wait(timeout=180)
        assert codes == [0, 0], run.log_text()[-4000:]
        assert driver.error is None, f"the operator metrics driver died: {driver.error!r}"
        ns = f'namespace="{namespace}"'
        # The pods are gone: evaluate the queries at the last scrape of both of them.
        end = _last_sample_time(prom, f"finetune_train_loss{{{ns}}}")
        phases = f"finetune_startup_phase_timestamp_seconds{{{ns}, phase='first_step'}}"
        training_started = float(prom.instant(f"min({phases})", at=end)[0]["value"][1])
        last_step = f"finetune_train_last_step_timestamp_seconds{{{ns}}}"
        training_ended = float(prom.instant(f"max({last_step})", at=end)[0]["value"][1])
        yield Live(
            prom,
            namespace,
            job,
            trainer_targets,
            start,
            end,
            run,
            training_started,
            training_ended,
            trainer_job,
            chart["Service"]["metadata"]["name"],
        )
    finally:
        run.kill()
        driver.stop_event.set()
        prom.stop()
        op_server.shutdown()
        op_server.server_close()


def test_training_learned_something(live: Live) -> None:
    result = live.run.result(0)
    assert result["status"] == "Succeeded" and result["steps"] == MAX_STEPS, result
    ppl = result["evaluation"]["perplexity"]
    assert ppl["before"] > ppl["after"] > 0, ppl
    assert live.run.result(1) == {"rank": 1, "status": "Succeeded"}


@pytest.mark.parametrize("name", sorted(variable_queries(DASHBOARD)))
def test_template_variable_lists_the_run(live: Live, name: str) -> None:
    label, selector = grafana_label_values(variable_queries(DASHBOARD)[name])
    values = live.prom.label_values(label, substitute(selector, live.range_s))
    expected = {
        # No cluster label here: the variable is then empty (All), and must filter nothing out.
        "cluster": set(),
        "namespace": {live.namespace},
        "finetunejob": {live.job},
        "attempt": {"1"},
        "rank": {"0", "1"},
    }
    assert expected[name] <= set(values)


@pytest.mark.parametrize(
    ("panel", "target"),
    TARGETS,
    ids=[
        f"{p['id']}{t['refId']}-{re.sub(r'[^a-z0-9]+', '-', p['title'].lower()).strip('-')}"
        for p, t in TARGETS
    ],
)
def test_dashboard_query_returns_data(live: Live, panel: dict, target: dict) -> None:
    expr = substitute(target["expr"], live.range_s)
    if target.get("instant"):
        result = live.prom.instant(expr, at=live.end)
    else:
        result = live.prom.range(expr, live.start, live.end, step=SCRAPE_INTERVAL_S)
    assert result, f"{panel['title']!r} {target['refId']}: no series for\n{expr}"
    assert finite_values(result), f"{panel['title']!r} {target['refId']}: only NaN/Inf for\n{expr}"


def test_loss_sampled_once_per_scrape_with_the_expected_labels(live: Live) -> None:
    window = 10
    ns = live.namespace
    series = live.prom.instant(f'finetune_train_loss{{namespace="{ns}"}}', at=live.end)
    assert {s["metric"]["rank"] for s in series} == {"0", "1"}
    for s in series:
        labels = s["metric"]
        assert labels["finetunejob"] == live.job and labels["namespace"] == ns
        assert labels["job"] == live.trainer_job
        assert labels["attempt"] == "1"  # the PodMonitor's relabeling of the pod label
        assert labels["instance"] in live.trainer_targets
        loss_count = live.prom.instant(
            f'count_over_time(finetune_train_loss{{namespace="{ns}", rank="{labels["rank"]}"}}'
            f"[{window}s])",
            at=live.end,
        )
        # Successful scrapes only: a scrape that timed out on the busy machine records up=0
        # and, rightly, no loss sample.
        scrapes = live.prom.instant(
            f'sum_over_time(up{{instance="{labels["instance"]}"}}[{window}s])', at=live.end
        )
        n_loss, n_up = float(loss_count[0]["value"][1]), float(scrapes[0]["value"][1])
        assert abs(n_loss - n_up) <= 1, (n_loss, n_up)
        assert n_loss >= 3, f"too few scrapes in {window}s to say anything: {n_loss}"
    # What was scraped is what was trained: the last exported loss is what rank 0 logged for
    # that step (its final step, when the exporter is scraped after training).
    logged = dict(live.run.logged_losses())
    step = live.prom.instant(f'finetune_train_step{{namespace="{ns}", rank="0"}}', at=live.end)
    assert int(float(step[0]["value"][1])) in logged, (step, sorted(logged)[-5:])
    loss0 = next(s for s in series if s["metric"]["rank"] == "0")
    assert math.isclose(
        float(loss0["value"][1]), logged[int(float(step[0]["value"][1]))], abs_tol=5e-5
    )


def test_each_rank_says_what_a_stop_would_take_against_its_grace_period(live: Live) -> None:
    """After each save every rank exports its longest recent step and last save, what a SIGTERM
    would take, beside the pods' grace period (Kubernetes' 30 s: the template sets none)."""
    ns = f'namespace="{live.namespace}"'

    def by_rank(name: str) -> dict[str, float]:
        series = live.prom.instant(f"{name}{{{ns}}}", at=live.end)
        return {s["metric"]["rank"]: float(s["value"][1]) for s in series}

    stop = by_rank(STOP_SECONDS_GAUGE)
    assert by_rank(GRACE_PERIOD_GAUGE) == {"0": 30.0, "1": 30.0}
    assert set(stop) == {"0", "1"} and all(0 < v < 30 for v in stop.values()), stop
    # At least the save itself: the mean save time the trainer observed.
    saves = by_rank("finetune_checkpoint_save_duration_seconds_sum")
    counts = by_rank("finetune_checkpoint_save_duration_seconds_count")
    assert all(stop[r] >= 0.5 * saves[r] / counts[r] for r in stop), (stop, saves, counts)


def test_alert_rules_load_and_stay_silent(live: Live) -> None:
    groups = live.prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # The healthy job raises nothing, the operator acts (the down alert's job label is the
    # one the ServiceMonitor's targets get); the other job's failure raises exactly
    # FineTuneJobFailed, naming it.
    alerts = live.prom.api("alerts")["alerts"]
    keys = ("alertname", "namespace", "finetunejob", "reason")
    seen = [(*(a["labels"].get(k) for k in keys), a["state"]) for a in alerts]
    failed = ("FineTuneJobFailed", live.namespace, OTHER_JOB, "BackoffLimitExceeded", "firing")
    assert seen == [failed], alerts
    down = loaded["FineTuneOperatorDown"]["query"]
    assert f'job="{live.operator_job}"' in down
    assert live.prom.instant(down, at=live.end) == []
    # The stall alert's joins (status, up) match real target labels: while training, its
    # condition without the threshold yields the job; once training ended, nothing.
    stalled = next(r for r in alert_rules() if r["alert"] == "FineTuneJobStalled")
    inner = stalled["expr"].rsplit(">", 1)[0]
    while_training = live.prom.instant(inner, at=(live.training_started + live.training_ended) / 2)
    assert [(s["metric"]["namespace"], s["metric"]["finetunejob"]) for s in while_training] == [
        (live.namespace, live.job)
    ]
    # The age of the last step. Prometheus stamps a sample with the time its scrape started, and
    # a step can end between that and the trainer's answer, so the age may dip below zero by up
    # to one scrape's duration (-0.08 s seen with two test workers on 2 cores).
    assert -1 < float(while_training[0]["value"][1]) < 10
    assert live.prom.instant(inner, at=live.end) == []


def _panel_data(live: Live, panel: dict) -> list[tuple[str, list[float], list[float]]]:
    """(legend, times relative to the first scrape, values) of each series of a panel."""
    out = []
    for target in panel["targets"]:
        expr = substitute(target["expr"], live.range_s)
        if target.get("instant"):
            result = live.prom.instant(expr, at=live.end)
            rows = [(s["metric"], [s["value"]]) for s in result]
        else:
            result = live.prom.range(expr, live.start, live.end, step=SCRAPE_INTERVAL_S)
            rows = [(s["metric"], s["values"]) for s in result]
        for labels, samples in rows:
            ts = [float(t) - live.start for t, _ in samples]
            vs = [float(v) for _, v in samples]
            out.append((legend(target["legendFormat"], labels), ts, vs))
    return out


def _draw(ax: Any, panel: dict, data: list, small: bool = False) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    ax.set_title(panel["title"], fontsize=8 if small else 11)
    if panel["type"] == "timeseries":
        for name, ts, vs in data:
            ax.plot(ts, vs, label=name, linewidth=1)
        ax.set_xlabel("seconds since the first scrape", fontsize=7 if small else 9)
    else:
        names = [name for name, _, _ in data]
        values = [vs[-1] for _, _, vs in data]
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(values)), names, fontsize=6 if small else 8)
        ax.invert_yaxis()
    if unit:
        label = ax.set_ylabel if panel["type"] == "timeseries" else ax.set_xlabel
        label(unit, fontsize=7 if small else 9)
    if panel["type"] == "timeseries" and not small:
        ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=6 if small else 8)
    ax.grid(alpha=0.3)


def test_render_dashboard_panels_to_png(live: Live) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for old in RESULTS_DIR.glob("*.png"):
        old.unlink()
    all_panels = list(panels(DASHBOARD))
    data = {p["id"]: _panel_data(live, p) for p in all_panels}
    written = []
    for panel in all_panels:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=90, layout="constrained")
        _draw(ax, panel, data[panel["id"]])
        slug = re.sub(r"[^a-z0-9]+", "-", panel["title"].lower()).strip("-")
        path = RESULTS_DIR / f"{panel['id']:02d}-{slug}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    cols = 4
    rows = math.ceil(len(all_panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3 * rows), dpi=70, layout="constrained")
    for ax, panel in zip(axes.flat, all_panels, strict=False):
        _draw(ax, panel, data[panel["id"]], small=True)
    for ax in list(axes.flat)[len(all_panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"{DASHBOARD['title']}: {live.namespace}/{live.job}, a live run scraped with "
        "the chart's monitors"
    )
    overview = RESULTS_DIR / "overview.png"
    fig.savefig(overview)
    plt.close(fig)
    written.append(overview)
    for path in written:
        assert path.stat().st_size > 5_000, path


def test_attempt_variable_selects_the_attempt_the_pods_belong_to(live: Live) -> None:
    loss = next(p for p in panels(DASHBOARD) if p["title"] == "Training loss")
    (target,) = loss["targets"]

    def ranks(attempt: str) -> set[str]:
        expr = substitute(target["expr"].replace("$attempt", attempt), live.range_s)
        return {s["metric"]["rank"] for s in live.prom.instant(expr, at=live.end)}

    assert ranks("1") == {"0", "1"}
    assert ranks("2") == set()


def test_job_table_names_each_job_with_phase_reason_and_attempt(live: Live) -> None:
    table = next(p for p in panels(DASHBOARD) if p["type"] == "table")
    status_expr, attempt_expr = (substitute(t["expr"], live.range_s) for t in table["targets"])

    def rows() -> set[tuple[str, str, str]]:
        result = live.prom.instant(status_expr)
        return {
            (r["metric"]["finetunejob"], r["metric"]["phase"], r["metric"]["reason"])
            for r in result
            if r["metric"]["namespace"] == live.namespace
        }

    # The driver marks the run Succeeded once its processes have exited.
    wait_until(lambda: (live.job, "Succeeded", "PushedToHub") in rows(), 30, "Succeeded row")
    assert rows() == {
        (live.job, "Succeeded", "PushedToHub"),
        (OTHER_JOB, "Failed", "BackoffLimitExceeded"),
    }
    attempts = {
        r["metric"]["finetunejob"]: float(r["value"][1]) for r in live.prom.instant(attempt_expr)
    }
    assert attempts == {live.job: 1.0, OTHER_JOB: 2.0}
