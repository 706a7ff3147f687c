"""The cluster side of `finetune` without a cluster: how status reads, what counts as finished,
where the kubeconfig, context and namespace come from. tests/controlplane/test_cli.py runs the
same commands against a real API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_cli.exits import CommandError, Exit
from finetune_cli.kube import Cluster, Target, container_started, context_namespace, pod_index
from finetune_cli.logs import prefix
from finetune_cli.retry import again, what_survives
from finetune_cli.status import duration, explaining_condition, one_line, summary, text, verdict
from finetune_cli.submit import watch_hints


def ftj(status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


RUNNING = ftj(
    {
        "phase": "Running",
        "attempts": 2,
        "disruptions": 1,
        "conditions": [
            cond("Created", "True", "WorkloadCreated"),
            cond("Running", "True", "PodsRunning", "2 of 2 pods running"),
        ],
        "progress": {
            "step": 25,
            "totalSteps": 100,
            "percent": 25,
            "loss": 1.5,
            "tokensPerSecond": 12345.6,
            "etaSeconds": 150,
        },
    }
)
SUCCEEDED = ftj(
    {
        "phase": "Succeeded",
        "attempts": 1,
        "conditions": [
            cond("Evaluated", "True", "EvaluationCompleted", "accuracy"),
            cond("Pushed", "True", "PushedToHub", "org/x@abc123"),
            cond("Running", "False", "TrainingCompleted"),
            cond("Succeeded", "True", "TrainingCompleted", "all ranks succeeded"),
        ],
        "progress": {"step": 30, "totalSteps": 30, "percent": 100, "loss": 0.4},
        "evaluation": {
            "accuracy": {"before": 0.52, "after": 0.81},
            "f1": {"before": None, "after": 0.7},
        },
        "result": {
            "repo": "org/x",
            "revision": "abc123",
            "url": "https://hub/x",
            "artifact": "adapter",
        },
    }
)
FAILED = ftj(
    {
        "phase": "Failed",
        "attempts": 1,
        "conditions": [cond("Failed", "True", "EvaluationGateFailed", "accuracy 0.3 < 0.9")],
    }
)
BLOCKED = ftj(
    {
        "phase": "Pending",
        "conditions": [cond("Created", "False", "SecretNotFound", "Secret hf not found")],
    }
)


def test_running_status_shows_progress_and_why() -> None:
    out = text(RUNNING)
    assert "Name:       team-a/demo" in out
    assert "Phase:      Running" in out
    assert "Reason:     PodsRunning (Running=True)" in out
    assert "Message:    2 of 2 pods running" in out
    assert "Progress:   step 25/100 (25%), loss 1.5000, 12,346 tokens/s, eta 2m30s" in out
    assert "Attempts:   2 (1 restart(s) after a disruption, not counted as failures)" in out
    assert "Pushed" not in out


def test_finished_status_shows_scores_before_and_after_and_the_push() -> None:
    out = text(SUCCEEDED)
    assert "Reason:     TrainingCompleted (Succeeded=True)" in out
    assert "Evaluation: accuracy 0.5200 → 0.8100" in out
    assert "            f1 n/a → 0.7000" in out
    assert "Pushed:     org/x@abc123 (adapter)" in out
    assert summary(SUCCEEDED)["result"] == {
        "repo": "org/x",
        "revision": "abc123",
        "url": "https://hub/x",
        "artifact": "adapter",
    }


def test_failed_and_blocked_name_their_condition() -> None:
    assert "Reason:     EvaluationGateFailed (Failed=True)" in text(FAILED)
    assert "Message:    accuracy 0.3 < 0.9" in text(FAILED)
    blocked = explaining_condition(BLOCKED)
    assert blocked is not None and blocked["reason"] == "SecretNotFound"
    assert "SecretNotFound (Created=False)" in text(BLOCKED)
    assert "the operator has not seen" in text(ftj(None))
    assert summary(ftj(None))["phase"] == "Pending"


def test_status_says_where_the_checkpoints_are_and_what_outlives_the_job() -> None:
    kept = {
        "store": "Volume",
        "claimName": "demo-checkpoints",
        "resumedFromStep": 40,
        "stepsLost": 3,
        "claimRetained": True,
    }
    failed = ftj({**FAILED["status"], "checkpoints": kept})
    assert (
        "Checkpoints: PersistentVolumeClaim demo-checkpoints, resumed from step 40, 3 step(s) "
        "lost to restarts, kept past this FineTuneJob: `finetune retry demo` resumes from it"
    ) in text(failed)
    branch = ftj({**RUNNING["status"], "checkpoints": {"store": "HubBranch", "hubBranch": "ck"}})
    assert "Checkpoints: Hub branch ck\n" in text(branch) + "\n"
    nowhere = ftj({**RUNNING["status"], "checkpoints": {"store": "Ephemeral"}})
    assert "Checkpoints: nowhere durable: a restart begins at step 0" in text(nowhere)
    assert "Checkpoints" not in text(RUNNING)  # no store chosen yet
    # A stop that would not save in time is a warning of its own; one that would is not.
    slow = cond("SavesOnStop", "False", "GracePeriodTooShort", "a stop needs about 42 s")
    tight = ftj({**RUNNING["status"], "conditions": [*RUNNING["status"]["conditions"], slow]})
    assert "Warning:    GracePeriodTooShort: a stop needs about 42 s" in text(tight)
    fits = cond("SavesOnStop", "True", "WithinGracePeriod", "about 7 s")
    roomy = ftj({**RUNNING["status"], "conditions": [*RUNNING["status"]["conditions"], fits]})
    assert "Warning" not in text(roomy) and "Warning" not in text(RUNNING)
    # Deleted while it runs, and held until its claim is kept (whenDeleted: Retain).
    deleting = {**RUNNING, "metadata": {**RUNNING["metadata"], "deletionTimestamp": "t"}}
    deleting["metadata"]["finalizers"] = ["finetune.dev/finalizer"]
    assert "Deleting:   the operator stops the gang, then keeps its checkpoint claim" in text(
        deleting
    )
    assert summary(deleting)["deleting"] is True and summary(RUNNING)["deleting"] is False


def test_the_summary_is_plain_data() -> None:
    """-o yaml dumps it with safe_dump, which refuses enums and other objects."""
    for obj in (RUNNING, SUCCEEDED, FAILED, BLOCKED, ftj(None)):
        assert yaml.safe_load(yaml.safe_dump(summary(obj))) == summary(obj)


def test_the_verdict_comes_from_the_conditions() -> None:
    assert verdict(SUCCEEDED) == "Succeeded"
    assert verdict(FAILED) == "Failed"
    assert verdict(RUNNING) is None and verdict(BLOCKED) is None and verdict(ftj(None)) is None
    # The conditions are the truth when a stale phase disagrees.
    stale = ftj({"phase": "Running", "conditions": [cond("Failed", "True", "DeadlineExceeded")]})
    assert verdict(stale) == "Failed"
    assert one_line(FAILED) == "demo: Failed (EvaluationGateFailed: accuracy 0.3 < 0.9)"


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59.6, "1m00s"), (150, "2m30s"), (3725, "1h02m")]
)
def test_duration(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_pods_are_ordered_and_prefixed_by_completion_index() -> None:
    pod = {
        "metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
        "status": {"phase": "Pending"},
    }
    assert pod_index(pod) == 3 and prefix(pod) == "[pod 3] "
    assert not container_started(pod)
    waiting = {"containerStatuses": [{"name": "trainer", "state": {"waiting": {}}}]}
    running = {"containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    assert not container_started({**pod, "status": waiting})
    assert container_started({**pod, "status": running})
    assert container_started({**pod, "status": {"phase": "Failed"}})


def test_submit_hints_reach_the_same_cluster() -> None:
    hints = watch_hints("demo", "team-a", Target(kubeconfig="/k/c fg", context="kind-x"))
    assert hints[0] == "kubectl get ftj demo -w -n team-a --context kind-x --kubeconfig '/k/c fg'"
    assert [h.split()[:2] for h in hints[1:]] == [
        ["finetune", "status"],
        ["finetune", "logs"],
        ["finetune", "wait"],
    ]
    assert "-f" in hints[2].split()


# ---- kubeconfig, context, namespace -------------------------------------------------------------


def kubeconfig(path: Path, contexts: dict[str, str | None], current: str) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": "c", "user": "u", **({"namespace": ns} if ns else {})},
            }
            for name, ns in contexts.items()
        ],
        "current-context": current,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_namespace_comes_from_the_flag_then_the_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = kubeconfig(tmp_path / "config", {"a": "team-a", "b": None}, current="a")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert context_namespace(str(path), None) == "team-a"
    assert context_namespace(str(path), "b") == "default"
    # Connecting reads the config only; nothing is sent to the (unreachable) server.
    assert Cluster.connect(Target(str(path))).namespace == "team-a"
    assert Cluster.connect(Target(str(path), context="b")).namespace == "default"
    assert Cluster.connect(Target(str(path), context="b", namespace="x")).namespace == "x"
    with pytest.raises(CommandError) as missing:
        Cluster.connect(Target(str(path), context="nope"))
    assert missing.value.code == Exit.CLUSTER


def test_kubeconfig_env_is_a_merged_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = kubeconfig(tmp_path / "one", {"a": "team-a"}, current="a")
    second = kubeconfig(tmp_path / "two", {"b": "team-b"}, current="b")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    # kubectl's rule: the first file's current-context wins, contexts come from all files.
    assert Cluster.connect(Target()).namespace == "team-a"
    assert Cluster.connect(Target(context="b")).namespace == "team-b"


def test_no_kubeconfig_is_a_cluster_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CommandError) as none:
        Cluster.connect(Target())
    assert none.value.code == Exit.CLUSTER and "--kubeconfig" in str(none.value)


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_status_output_is_the_summary(
    output: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from finetune_cli.main import main

    class Found:
        def require(self, name: str) -> dict[str, Any]:
            assert name == "demo"
            return SUCCEEDED

    monkeypatch.setattr(Cluster, "connect", classmethod(lambda cls, target: Found()))
    assert main(["status", "demo", "-o", output]) == Exit.OK
    out = capsys.readouterr().out
    parsed = json.loads(out) if output == "json" else yaml.safe_load(out)
    assert parsed == summary(SUCCEEDED)


def test_retry_makes_the_job_again_from_its_name_labels_own_annotations_and_spec() -> None:
    old = ftj({"phase": "Failed"})
    old["spec"] = {"model": {"source": "hf://org/m"}}
    old["metadata"].update(
        uid="u1",
        resourceVersion="7",
        generation=1,
        finalizers=["finetune.dev/finalizer"],
        labels={"team": "ml"},
        annotations={
            "owner": "ana",
            "finetune.dev/last-handled-configuration": "{}",
            "finetune.dev/kopf-managed": "yes",
            "kopf.zalando.org/last-handled-configuration": "{}",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        },
    )
    assert again(old) == {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "demo",
            "namespace": "team-a",
            "labels": {"team": "ml"},
            "annotations": {"owner": "ana"},
        },
        "spec": {"model": {"source": "hf://org/m"}},
    }


@pytest.mark.parametrize(
    ("checkpoints", "said"),
    [
        ({"store": "Volume", "claimName": "c", "claimRetained": True}, "resumes from the "),
        ({"store": "Volume", "claimName": "mine"}, "checkpoints on claim mine"),
        ({"store": "Volume", "claimName": "c", "claimRetained": False}, "went with it"),
        ({"store": "HubBranch", "hubBranch": "ckpt"}, "on branch ckpt of its repo"),
        ({"store": "Ephemeral"}, "were not durable: the new job starts from step 0"),
    ],
)
def test_retry_says_where_the_new_job_finds_the_old_ones_work(
    checkpoints: dict[str, Any], said: str
) -> None:
    assert said in what_survives(ftj({"phase": "Failed", "checkpoints": checkpoints}))
