"""The `finetune` command's cluster side against a real API server, with the operator running.

There is no kubelet: as in test_operator.py, the tests play it by patching pod status, and the
operator and the Job controller react. The CLI runs as a real process with KUBECONFIG (or
--kubeconfig) pointing at the session's control plane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from fixtures.cluster import (
    ftj_manifest,
    patch_pod_status,
    storage_class,
    terminated_status,
    wait_phase,
)
from fixtures.kube import Kube
from test_operator import RESULT

if TYPE_CHECKING:
    from fixtures.operator import Operator

pytest_plugins = ["fixtures.operator"]

WaitUntil = Callable[..., Any]
Kube.register("PersistentVolumeClaim", "v1", "persistentvolumeclaims")
Kube.register("StorageClass", "storage.k8s.io/v1", "storageclasses", namespaced=False)
GATE = {"status": "Failed", "reason": "EvaluationGateFailed", "message": "accuracy 0.30 < 0.90"}


class Finetune:
    """`python -m finetune_cli` against the session's cluster, through KUBECONFIG."""

    def __init__(self, kubeconfig: str) -> None:
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "finetune_cli", *args]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def finetune(kubeconfig: str) -> Finetune:
    return Finetune(kubeconfig)


def get(kube: Kube, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    return kube.get(kind, name, namespace)


def wait_pods(
    kube: Kube, wait_until: WaitUntil, ns: str, name: str, n: int = 2
) -> list[dict[str, Any]]:
    def pods() -> list[dict[str, Any]] | None:
        sel = f"finetune.dev/job-name={name},finetune.dev/attempt=1"
        items = kube.list("Pod", ns, labels=sel)
        if len(items) != n:
            return None
        index = "batch.kubernetes.io/job-completion-index"
        return sorted(items, key=lambda p: int(p["metadata"]["annotations"][index]))

    return wait_until(pods, timeout=60, message=f"{n} pods of {ns}/{name}")


def finish(kube: Kube, ns: str, pods: list[dict[str, Any]], code: int, result: dict) -> None:
    """Rank 0 ends with `code` and the result as its termination message; the others with 0."""
    for i, pod in enumerate(pods):
        message = json.dumps(result) if i == 0 else ""
        status = terminated_status(pod, code if i == 0 else 0, message)
        patch_pod_status(kube, ns, pod["metadata"]["name"], status)


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- submit -------------------------------------------------------------------------------------


def test_submit_applies_and_a_second_submit_changes_nothing(
    operator: Operator, kube, namespace, wait_until, finetune, kubeconfig, tmp_path
) -> None:
    manifest = write(tmp_path / "job.yaml", ftj_manifest("sub", namespace))
    first = finetune("submit", str(manifest))
    assert first.returncode == 0, first.stderr
    assert f"finetunejob.finetune.dev/sub created in namespace {namespace}" in first.stdout
    for hint in (
        f"kubectl get ftj sub -w -n {namespace}",
        f"finetune status sub -n {namespace}",
        f"finetune logs sub -f -n {namespace}",
        f"finetune wait sub -n {namespace}",
    ):
        assert hint in first.stdout, first.stdout
    ftj = kube.get("FineTuneJob", "sub", namespace)
    assert ftj is not None
    assert ftj["spec"]["resources"]["nodes"] == 2
    managers = {(m["manager"], m["operation"]) for m in ftj["metadata"]["managedFields"]}
    assert ("finetune-cli", "Apply") in managers
    # The operator picks it up like any other FineTuneJob.
    wait_until(lambda: get(kube, namespace, "Job", "sub"), timeout=30, message="Job")

    second = finetune("submit", str(manifest))
    assert second.returncode == 0, second.stderr
    assert "finetunejob.finetune.dev/sub unchanged" in second.stdout
    again = get(kube, namespace, "FineTuneJob", "sub")
    assert again is not None and again["metadata"]["generation"] == 1
    assert again["metadata"]["uid"] == ftj["metadata"]["uid"]


def test_submit_takes_the_namespace_from_the_flag_and_the_context(
    operator: Operator, kube, kubectl, namespace, finetune, kubeconfig, tmp_path
) -> None:
    doc = ftj_manifest("nons", namespace)
    del doc["metadata"]["namespace"]
    manifest = write(tmp_path / "job.yaml", doc)
    done = finetune("submit", str(manifest), "-n", namespace)
    assert done.returncode == 0, done.stderr
    assert get(kube, namespace, "FineTuneJob", "nons") is not None
    # A context whose namespace is the test's: no -n needed, as with kubectl. The session's
    # kubeconfig as kubectl merges it (KUBECONFIG may list several files).
    config = yaml.safe_load(kubectl("config", "view", "--raw", "-o", "yaml").stdout)
    config["contexts"][0]["context"]["namespace"] = namespace
    config["current-context"] = config["contexts"][0]["name"]
    own = write(tmp_path / "kubeconfig", config)
    status = finetune("status", "nons", "--kubeconfig", str(own))
    assert status.returncode == 0, status.stderr
    assert f"Name:       {namespace}/nons" in status.stdout
    clash = finetune(
        "submit", str(write(tmp_path / "b.yaml", ftj_manifest("b", namespace))), "-n", "other"
    )
    assert clash.returncode == 2 and "-n says other" in clash.stderr


def test_submit_refuses_what_the_schema_or_the_server_rejects(
    operator: Operator, kube, namespace, finetune, tmp_path
) -> None:
    bad = write(tmp_path / "bad.yaml", ftj_manifest("bad", namespace, peft={"r": 0}))
    done = finetune("submit", str(bad))
    assert done.returncode == 3
    assert "spec.peft.r" in done.stderr
    assert get(kube, namespace, "FineTuneJob", "bad") is None
    # The spec is immutable once created: the API server's CEL rule says no, and so does submit.
    manifest = write(tmp_path / "job.yaml", ftj_manifest("imm", namespace))
    assert finetune("submit", str(manifest)).returncode == 0
    write(manifest, ftj_manifest("imm", namespace, resources={"nodes": 3}))
    changed = finetune("submit", str(manifest))
    assert changed.returncode == 3, changed.stdout + changed.stderr
    assert "immutable" in changed.stderr


# ---- status and wait ----------------------------------------------------------------------------


def test_wait_and_status_follow_a_job_to_success(
    operator: Operator, kube, namespace, wait_until, finetune, tmp_path
) -> None:
    assert (
        finetune(
            "submit", str(write(tmp_path / "j.yaml", ftj_manifest("ok", namespace)))
        ).returncode
        == 0
    )
    waiter = finetune.start("wait", "ok", "-n", namespace, "--timeout", "120")
    pods = wait_pods(kube, wait_until, namespace, "ok")
    finish(kube, namespace, pods, 0, RESULT)
    out, err = waiter.communicate(timeout=150)
    assert waiter.returncode == 0, out + err
    assert out.strip() == "ok: Succeeded (TrainingCompleted: all ranks succeeded)"

    # What the operator derived from the result, plus progress as a scrape would have left it:
    # a finished FineTuneJob's status is never rewritten, so the patch stays.
    progress = {"tokensPerSecond": 2048.0, "etaSeconds": 0, "epoch": 1.0}

    def patched() -> dict[str, Any] | None:
        done = finetune("status", "ok", "-n", namespace, "-o", "json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        if report["progress"].get("tokensPerSecond") == 2048.0:
            return report
        # Again if an operator pass that read the object before the patch wrote after it.
        kube.patch("FineTuneJob", "ok", namespace, {"status": {"progress": progress}}, "status")
        return None

    report = wait_until(patched, timeout=30, message="patched progress in finetune status")
    assert report["phase"] == "Succeeded" and report["attempts"] == 1
    assert report["condition"]["reason"] == "TrainingCompleted"
    assert report["evaluation"] == {"accuracy": {"before": 0.52, "after": 0.81}}
    assert report["result"]["revision"] == RESULT["revision"]
    assert (report["progress"]["step"], report["progress"]["loss"]) == (30, 0.4)
    text = finetune("status", "ok", "-n", namespace)
    assert text.returncode == 0, text.stderr
    for line in (
        "Phase:      Succeeded",
        "Reason:     TrainingCompleted (Succeeded=True)",
        "Progress:   step 30/30 (100%), loss 0.4000, 2,048 tokens/s, eta 0s",
        "Evaluation: accuracy 0.5200 → 0.8100",
        "Attempts:   1",
        "Pushed:     org/x@0123456789abcdef (adapter)",
    ):
        assert line in text.stdout, text.stdout
    as_yaml = yaml.safe_load(finetune("status", "ok", "-n", namespace, "-o", "yaml").stdout)
    assert as_yaml == report


def test_wait_exits_1_when_the_job_fails(
    operator: Operator, kube, namespace, wait_until, finetune, tmp_path
) -> None:
    doc = ftj_manifest("gate", namespace, runPolicy={"backoffLimit": 3})
    assert finetune("submit", str(write(tmp_path / "j.yaml", doc))).returncode == 0
    waiter = finetune.start("wait", "gate", "-n", namespace, "--timeout", "120")
    pods = wait_pods(kube, wait_until, namespace, "gate")
    finish(kube, namespace, pods[:1], 4, GATE)
    out, err = waiter.communicate(timeout=150)
    assert waiter.returncode == 1, out + err
    assert out.strip() == "gate: Failed (EvaluationGateFailed: accuracy 0.30 < 0.90)"
    status = finetune("status", "gate", "-n", namespace)
    assert "Reason:     EvaluationGateFailed (Failed=True)" in status.stdout
    # Waiting on a finished job answers at once, from the first read.
    assert finetune("wait", "gate", "-n", namespace, "--timeout", "30").returncode == 1


def test_wait_times_out_and_says_where_the_job_is(
    operator: Operator, kube, namespace, wait_until, finetune, tmp_path
) -> None:
    assert (
        finetune(
            "submit", str(write(tmp_path / "j.yaml", ftj_manifest("slow", namespace)))
        ).returncode
        == 0
    )
    wait_until(
        lambda: (get(kube, namespace, "FineTuneJob", "slow") or {}).get("status"),
        timeout=30,
        message="the operator's first status",
    )
    done = finetune("wait", "slow", "-n", namespace, "--timeout", "2")
    assert done.returncode == 124, done.stdout + done.stderr
    assert "timed out after 2s: slow: Pending" in done.stderr
    missing = finetune("wait", "nope", "-n", namespace, "--timeout", "2")
    assert missing.returncode == 5 and "not found" in missing.stderr
    assert finetune("status", "nope", "-n", namespace).returncode == 5


def test_logs_picks_the_attempts_pods_in_rank_order(
    operator: Operator, kube, namespace, wait_until, finetune, tmp_path
) -> None:
    """Without kubelets no container ever starts, so this checks which pods logs reads and in
    which order; tests/kind/test_e2e.py reads real logs."""
    assert (
        finetune(
            "submit", str(write(tmp_path / "j.yaml", ftj_manifest("lg", namespace)))
        ).returncode
        == 0
    )
    wait_pods(kube, wait_until, namespace, "lg")
    done = finetune("logs", "lg", "-n", namespace)
    assert done.returncode == 0, done.stderr
    # The pods' headers, in rank order (a library's warning on stderr is no pod's).
    headers = [line.split(" (")[0] for line in done.stderr.splitlines() if line.startswith("[pod")]
    assert headers == ["[pod 0]", "[pod 1]"], done.stderr
    none = finetune("logs", "lg", "-n", namespace, "--attempt", "7")
    assert none.returncode == 5 and "no pods of attempt 7" in none.stderr


# ---- retry --------------------------------------------------------------------------------------


def test_retry_makes_a_failed_job_again_and_it_adopts_the_claim_the_failed_one_kept(
    operator: Operator, kube, namespace, wait_until, finetune
) -> None:
    # A class of its own (nothing provisions it here): no default class shared with other tests.
    own_class = f"finetune-test-{namespace}"
    kube.apply(storage_class(own_class))
    try:
        output = {"checkpoints": {"storageClassName": own_class}}
        manifest = ftj_manifest("again", namespace, resources={"nodes": 1}, output=output)
        manifest["metadata"]["labels"] = {"team": "ml"}
        kube.apply(manifest)
        early = finetune("retry", "again", "-n", namespace)
        assert early.returncode == 2 and "not Failed" in early.stderr, early.stderr
        refused = {"status": "Failed", "reason": "PushFailed", "message": "403", "retryable": False}
        finish(kube, namespace, wait_pods(kube, wait_until, namespace, "again", 1), 3, refused)
        wait_phase(kube, wait_until, namespace, "again", "Failed")
        old = get(kube, namespace, "FineTuneJob", "again")

        done = finetune("retry", "again", "-n", namespace)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(
            f"finetunejob.finetune.dev/again made again in namespace {namespace}: it resumes "
            "from the checkpoints on claim again-checkpoints\n"
        ), done.stdout
        new = get(kube, namespace, "FineTuneJob", "again")
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        assert new["metadata"]["labels"] == {"team": "ml"}
        assert new["spec"] == old["spec"]

        def adopted() -> bool:
            claim = get(kube, namespace, "PersistentVolumeClaim", "again-checkpoints") or {}
            owners = (claim.get("metadata") or {}).get("ownerReferences") or []
            return [o["uid"] for o in owners] == [new["metadata"]["uid"]]

        # At once: made without the operator's bookkeeping of the old one, it gets its create
        # pass (the resync comes up to a minute later).
        wait_until(adopted, timeout=15, message="the claim adopted by the job made again")
        wait_pods(kube, wait_until, namespace, "again", 1)

    finally:
        kube.delete("StorageClass", own_class, missing_ok=True)
