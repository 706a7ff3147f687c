"""The operator as a subprocess against a real API server, Job controller and GC.

There is no kubelet: the tests play it by patching pods/status, and the real Job controller
reacts. Every wait polls with a timeout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from fixtures.cluster import (
    condition,
    ftj_manifest,
    ftj_status,
    full_quota,
    patch_pod_status,
    room_in_quota,
    running_status,
    terminated_status,
    wait_condition,
    wait_phase,
)
from fixtures.kube import Kube

from finetune_operator.timings import unix

if TYPE_CHECKING:
    from fixtures.operator import Operator, Rank0Metrics

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
GOLDEN = Path(__file__).resolve().parents[1] / "unit" / "golden"
RESULT = {
    "status": "Succeeded",
    "reason": "PushedToHub",
    "message": "pushed",
    "evaluation": {"accuracy": {"before": 0.52, "after": 0.81}},
    "repo": "org/x",
    "revision": "0123456789abcdef",
    "url": "https://huggingface.co/org/x/commit/0123456789abcdef",
    "artifact": "adapter",
    "modelRevision": "a" * 40,
    "datasetRevision": "b" * 40,
    "steps": 30,
    "trainLoss": 0.4,
}


def get(kube: Kube, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    return kube.get(kind, name, namespace)


def pods(kube: Kube, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
    sel = f"finetune.dev/job-name={name},finetune.dev/attempt={attempt}"
    items = kube.list("Pod", namespace, labels=sel)
    return sorted(
        items,
        key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]),
    )


def wait_pods(kube: Kube, wait_until: WaitUntil, ns: str, name: str, attempt: int, n: int):
    return wait_until(
        lambda: (p := pods(kube, ns, name, attempt)) and len(p) == n and p,
        timeout=60,
        message=f"{n} pods of attempt {attempt}",
    )


def finish_pods(kube: Kube, ns: str, pod_list: list[dict[str, Any]], exit_code: int, msg=""):
    for i, pod in enumerate(pod_list):
        message = msg if i == 0 else ""
        status = terminated_status(pod, exit_code if i == 0 else (exit_code or 0), message)
        patch_pod_status(kube, ns, pod["metadata"]["name"], status)


def create_secret(kube: Kube, namespace: str, name: str, key: str, value: str) -> None:
    """As `kubectl create secret generic NAME --from-literal=KEY=VALUE`."""
    meta = {"name": name, "namespace": namespace}
    kube.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {key: value}}
    )


@pytest.fixture
def hf_secret(kube: Kube, namespace: str) -> str:
    create_secret(kube, namespace, "hf-token", "token", "s3cr3t")
    return "hf-token"


@pytest.fixture
def metrics_endpoint(rank0_metrics: Rank0Metrics) -> str:
    """Rank 0 a quarter of the way through; returns the pod IP it answers on."""
    rank0_metrics.set(step=25, total=100, loss=1.5)
    return rank0_metrics.ip


def test_create_renders_children(
    operator: Operator, kube, kubectl, namespace, wait_until, hf_secret
):
    manifest = ftj_manifest(
        "demo",
        namespace,
        output={"hub": {"repo": "org/x", "tokenSecretRef": {"name": hf_secret}}},
    )
    kube.apply(manifest)
    job = wait_until(lambda: get(kube, namespace, "Job", "demo"), timeout=30, message="Job")
    svc = get(kube, namespace, "Service", "demo")
    cm = get(kube, namespace, "ConfigMap", "demo")
    assert svc and cm
    ftj = get(kube, namespace, "FineTuneJob", "demo")
    uid = ftj["metadata"]["uid"]  # type: ignore[index]
    for obj in (job, svc, cm):
        ref = obj["metadata"]["ownerReferences"][0]
        assert (ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == (uid, True, True)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "demo"
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # Rank 0's rendezvous store through a Service that outlives rank 0's pod.
    assert env["MASTER_ADDR"]["value"] == "demo-rendezvous"
    rdzv = get(kube, namespace, "Service", "demo-rendezvous")
    assert rdzv["spec"]["clusterIP"] not in ("", "None")
    assert rdzv["spec"]["selector"]["batch.kubernetes.io/job-completion-index"] == "0"
    assert rdzv["spec"]["publishNotReadyAddresses"] is True
    assert rdzv["metadata"]["ownerReferences"][0]["uid"] == uid
    assert env["NNODES"]["value"] == "2"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    # The HF cache emptyDir's size is requested too (template.cacheSize, default 20Gi).
    assert container["resources"]["requests"] == {
        "cpu": "100m",
        "memory": "128Mi",
        "ephemeral-storage": "20Gi",
    }
    doc = yaml.safe_load(cm["data"]["job.yaml"])  # type: ignore[index]
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert "s3cr3t" not in json.dumps(cm) + json.dumps(job)
    status = wait_until(
        lambda: (
            (s := ftj_status(kube, namespace, "demo")).get("attempts") == 1
            and condition(s, "Created").get("status") == "True"
            and s
        ),
        timeout=30,
        message="Created condition",
    )
    assert status["phase"] == "Pending"
    assert status["workload"] == {"jobName": "demo", "serviceName": "demo"}
    assert status["observedGeneration"] == ftj["metadata"]["generation"]  # type: ignore[index]
    # The CRD's printer columns, as kubectl shows them.
    table = kubectl("-n", namespace, "get", "ftj").stdout
    assert table.split("\n")[0].split()[:3] == ["NAME", "PHASE", "NODES"]
    assert "Pending" in table


def test_success_progress_and_result(
    operator: Operator, kube, kubectl, namespace, wait_until, metrics_endpoint
):
    kube.apply(ftj_manifest("ok", namespace))
    pod_list = wait_pods(kube, wait_until, namespace, "ok", 1, 2)
    for pod in pod_list:
        patch_pod_status(
            kube, namespace, pod["metadata"]["name"], running_status(pod, metrics_endpoint)
        )
    status = wait_phase(kube, wait_until, namespace, "ok", "Running")
    assert status["startTime"]
    status = wait_until(
        lambda: (
            (s := ftj_status(kube, namespace, "ok")).get("progress", {}).get("step") == 25 and s
        ),
        timeout=60,
        message="progress scraped from rank 0",
    )
    assert status["progress"]["percent"] == 25
    # Rank 0's phase stamps, seconds after the FineTuneJob's creation.
    created = unix(kube.get("FineTuneJob", "ok", namespace)["metadata"]["creationTimestamp"])
    offsets = {"rendezvous": 2.5, "first_step": 4.0, "last_step": 9.0, "result_written": 10.5}
    stamps = {phase: created + at for phase, at in offsets.items()}
    finish_pods(kube, namespace, pod_list, 0, json.dumps({**RESULT, "phases": stamps}))
    status = wait_phase(kube, wait_until, namespace, "ok", "Succeeded")
    # The pods played here started and ended at a fixed past time: written as 0, never less.
    # No scheduler runs here, so no pod is PodScheduled.
    startup = {"attempt": 1, "containerStarted": 0.0, "rendezvous": 2.5, "firstStep": 4.0}
    assert status["startup"] == startup
    assert status["finish"]["resultWritten"] == 1.5
    assert status["finish"]["podsExited"] == 0.0 and status["finish"]["succeeded"] >= 0
    assert status["evaluation"]["accuracy"] == {"before": 0.52, "after": 0.81}
    assert status["evaluationSummary"] == "accuracy 0.52→0.81"
    assert status["result"]["revision"] == RESULT["revision"]
    # The commits the sources were loaded at, kept by the API server's status schema.
    assert status["sources"] == {"modelRevision": "a" * 40, "datasetRevision": "b" * 40}
    assert status["completionTime"]
    assert condition(status, "Pushed")["status"] == "True"
    row = kubectl("-n", namespace, "get", "ftj", "ok", "--no-headers").stdout
    assert "Succeeded" in row and RESULT["revision"] in row and "100" in row
    # Events are posted after the status write that caused them: wait for them.
    wait_until(
        lambda: (
            "TrainingCompleted"
            in {e["reason"] for e in kube.list("Event", namespace, fields="involvedObject.name=ok")}
        ),
        timeout=30,
        message="the TrainingCompleted Event",
    )
    assert "finetune_operator_jobs" in operator.metrics()


def test_retry_then_backoff_limit(operator: Operator, kube, namespace, wait_until):
    kube.apply(ftj_manifest("retry", namespace, runPolicy={"backoffLimit": 1}))
    first = wait_pods(kube, wait_until, namespace, "retry", 1, 2)
    finish_pods(kube, namespace, first[:1], 1, "CUDA error: retryable")
    second = wait_pods(kube, wait_until, namespace, "retry", 2, 2)
    job = get(kube, namespace, "Job", "retry")
    assert job and job["metadata"]["labels"]["finetune.dev/attempt"] == "2"
    assert ftj_status(kube, namespace, "retry")["attempts"] == 2
    finish_pods(kube, namespace, second[:1], 137)
    status = wait_phase(kube, wait_until, namespace, "retry", "Failed")
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert status["attempts"] == 2


def test_permanent_exit_code_fails_at_once(operator: Operator, kube, namespace, wait_until):
    kube.apply(ftj_manifest("gate", namespace, runPolicy={"backoffLimit": 3}))
    pod_list = wait_pods(kube, wait_until, namespace, "gate", 1, 2)
    msg = json.dumps({"status": "Failed", "reason": "EvaluationGateFailed", "message": "acc 0.3"})
    finish_pods(kube, namespace, pod_list[:1], 4, msg)
    status = wait_phase(kube, wait_until, namespace, "gate", "Failed")
    assert condition(status, "Failed")["reason"] == "EvaluationGateFailed"
    assert status["attempts"] == 1


def test_suspend_and_resume(operator: Operator, kube, namespace, wait_until):
    kube.apply(ftj_manifest("sus", namespace, runPolicy={"suspend": True}))
    wait_until(
        lambda: (j := get(kube, namespace, "Job", "sus")) and j["spec"]["suspend"] is True,
        timeout=30,
        message="suspended Job",
    )
    wait_phase(kube, wait_until, namespace, "sus", "Suspended")
    kube.patch("FineTuneJob", "sus", namespace, {"spec": {"runPolicy": {"suspend": False}}})
    wait_until(
        lambda: (j := get(kube, namespace, "Job", "sus")) and j["spec"]["suspend"] is False,
        timeout=30,
        message="resumed Job",
    )
    status = wait_phase(kube, wait_until, namespace, "sus", "Pending")
    assert condition(status, "Suspended")["reason"] == "Resumed"


def test_kueue_queue_label(operator: Operator, kube, namespace, wait_until):
    kube.apply(ftj_manifest("queued", namespace, runPolicy={"queueName": "team-a"}))
    job = wait_until(lambda: get(kube, namespace, "Job", "queued"), timeout=30, message="Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True


def test_missing_secret_then_created(operator: Operator, kube, namespace, wait_until):
    manifest = ftj_manifest(
        "nosecret", namespace, output={"hub": {"repo": "org/x", "tokenSecretRef": {"name": "hf"}}}
    )
    kube.apply(manifest)
    status = wait_condition(
        kube, wait_until, namespace, "nosecret", "Created", reason="SecretNotFound"
    )
    assert "hf" in condition(status, "Created")["message"]
    assert get(kube, namespace, "Job", "nosecret") is None
    create_secret(kube, namespace, "hf", "token", "x")
    wait_until(lambda: get(kube, namespace, "Job", "nosecret"), timeout=60, message="Job")


def test_a_job_a_resource_quota_refuses_waits_for_room_and_then_runs(
    operator: Operator, kube, namespace, wait_until
):
    """A namespace's ResourceQuota (the API server's quota admission, the controller manager's
    quota controller: both real) refuses the Job: the FineTuneJob waits, saying so, as the Job
    controller does for its pods, and runs once the quota has room."""
    quota = full_quota(kube, wait_until, namespace, "count/jobs.batch")
    kube.apply(ftj_manifest("quota", namespace))
    status = wait_condition(kube, wait_until, namespace, "quota", "Created", reason="QuotaExceeded")
    created = condition(status, "Created")
    assert created["status"] == "False" and status["phase"] == "Pending"
    assert "exceeded quota: jobs" in created["message"] and "count/jobs.batch" in created["message"]
    assert get(kube, namespace, "Job", "quota") is None
    uid = get(kube, namespace, "FineTuneJob", "quota")["metadata"]["uid"]

    def warned() -> list[str]:
        events = kube.list("Event", namespace, fields=f"involvedObject.uid={uid}")
        return [e["type"] for e in events if e["reason"] == "QuotaExceeded"]

    # The Event follows the status write that carries the transition: waited for.
    wait_until(warned, timeout=15, message="the QuotaExceeded Event")
    assert warned() == ["Warning"]
    # Room again: the next look (every 10 s while Created=False) makes the Job.
    room_in_quota(kube, namespace, quota, "count/jobs.batch")
    wait_until(lambda: get(kube, namespace, "Job", "quota"), timeout=60, message="Job")
    wait_condition(kube, wait_until, namespace, "quota", "Created", status="True")


def test_a_missing_read_token_secret_blocks_the_job_too(
    operator: Operator, kube, namespace, wait_until, hf_secret
):
    manifest = ftj_manifest(
        "readtoken",
        namespace,
        model={"tokenSecretRef": {"name": "model-read", "key": "read"}},
        output={"hub": {"repo": "org/x", "tokenSecretRef": {"name": hf_secret}}},
    )
    kube.apply(manifest)
    status = wait_condition(
        kube, wait_until, namespace, "readtoken", "Created", reason="SecretNotFound"
    )
    assert "model.tokenSecretRef" in condition(status, "Created")["message"]
    assert get(kube, namespace, "Job", "readtoken") is None
    create_secret(kube, namespace, "model-read", "read", "x")
    job = wait_until(lambda: get(kube, namespace, "Job", "readtoken"), timeout=60, message="Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FINETUNE_MODEL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "model-read",
        "key": "read",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": hf_secret, "key": "token"}


def test_delete_garbage_collects_children(operator: Operator, kube, namespace, wait_until):
    kube.apply(ftj_manifest("gc", namespace))
    wait_until(lambda: get(kube, namespace, "Job", "gc"), timeout=30, message="Job")
    kube.delete("FineTuneJob", "gc", namespace)
    for kind, name in (
        ("Job", "gc"),
        ("Service", "gc"),
        ("Service", "gc-rendezvous"),
        ("ConfigMap", "gc"),
    ):
        wait_until(
            lambda kind=kind, name=name: get(kube, namespace, kind, name) is None,
            timeout=60,
            message=f"{kind} {name} collected",
        )


def test_a_copy_of_a_handled_finetunejob_gets_its_pass_at_once(
    operator: Operator, kube, namespace, wait_until
):
    """A FineTuneJob deleted and made again from its own copy (`kubectl get -o yaml` applied
    again, a backup restored) carries kopf's record of the configuration it handled: kopf runs
    no create handler for it, and without the operator's own look it waited for the resync.
    This one waits for a Secret, so no Job's events bring a pass either."""
    hub = {"repo": "org/out", "tokenSecretRef": {"name": "absent", "key": "token"}}
    kube.apply(ftj_manifest("copied", namespace, output={"hub": hub}))
    diffbase = "finetune.dev/last-handled-configuration"

    def handled() -> dict[str, Any] | None:
        ftj = get(kube, namespace, "FineTuneJob", "copied") or {}
        kept = diffbase in (ftj.get("metadata", {}).get("annotations") or {})
        blocked = condition(ftj.get("status") or {}, "Created").get("reason") == "SecretNotFound"
        return ftj if kept and blocked else None

    old = wait_until(handled, timeout=30, message="handled, and waiting for its Secret")
    meta = {k: old["metadata"][k] for k in ("name", "namespace", "annotations")}
    copy = {"apiVersion": old["apiVersion"], "kind": old["kind"], "metadata": meta}
    kube.delete("FineTuneJob", "copied", namespace)
    wait_until(
        lambda: get(kube, namespace, "FineTuneJob", "copied") is None,
        timeout=30,
        message="the old one gone",
    )
    made = kube.create({**copy, "spec": old["spec"]})

    def seen() -> bool:
        ftj = get(kube, namespace, "FineTuneJob", "copied") or {}
        mine = ftj.get("metadata", {}).get("uid") == made["metadata"]["uid"]
        status = ftj.get("status") or {}
        return mine and condition(status, "Created").get("reason") == "SecretNotFound"

    # Well within the resync (60 s), which was the only pass such a copy got.
    wait_until(seen, timeout=15, message="the copy's first pass")


def test_gpu_and_tpu_renders_are_accepted(operator: Operator, kube, namespace, wait_until):
    for case in ("gpu", "tpu"):
        doc = yaml.safe_load((GOLDEN / f"{case}.input.yaml").read_text())
        doc["metadata"]["namespace"] = namespace
        kube.apply(doc)
    for name in ("llama-qlora", "gemma-tpu"):
        job = wait_until(lambda n=name: get(kube, namespace, "Job", n), timeout=30, message=name)
        assert job["spec"]["suspend"] is True
    gpu = get(kube, namespace, "Job", "llama-qlora")
    limits = gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]  # type: ignore[index]
    assert limits["nvidia.com/gpu"] == "8"


def test_kill_and_restart_makes_no_duplicates(operator: Operator, kube, namespace, wait_until):
    names = [f"k{i}" for i in range(6)]
    for n in names:  # one after another, as kubectl applies a List
        kube.apply(ftj_manifest(n, namespace))
    operator.kill()
    operator.start()
    for n in names:
        wait_until(
            lambda n=n: (
                ftj_status(kube, namespace, n).get("attempts") == 1
                and get(kube, namespace, "Job", n)
            ),
            timeout=60,
            message=f"{n} Job after restart",
        )
    uids = {n: get(kube, namespace, "Job", n)["metadata"]["uid"] for n in names}  # type: ignore[index]
    operator.kill()
    operator.start()
    for n in names:
        wait_until(lambda n=n: len(pods(kube, namespace, n, 1)) == 2, timeout=30, message=n)
    jobs = kube.list("Job", namespace)
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(names)
    assert {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs} == uids
    for n in names:
        assert ftj_status(kube, namespace, n)["attempts"] == 1
        assert len(pods(kube, namespace, n, 1)) == 2


def test_rejected_render_fails_with_apply_rejected(operator: Operator, kube, namespace, wait_until):
    # The schema passes template.volumes through unchecked; the API server refuses the Job.
    bad = ftj_manifest("rejected", namespace, template={"volumes": [{"name": "Not_A_DNS_Label"}]})
    kube.apply(bad)
    status = wait_phase(kube, wait_until, namespace, "rejected", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "ApplyRejected"
    assert "Not_A_DNS_Label" in failed["message"]
    assert get(kube, namespace, "Job", "rejected") is None
