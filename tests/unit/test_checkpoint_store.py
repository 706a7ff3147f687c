"""Where checkpoints live (finetune_operator.checkpoints), how the pods get that store, and what
status says about it: the durable-by-default rule of docs/api.md, without a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api import pod
from finetune_api.constants import ConditionType, Reason
from finetune_api.result import TrainerResult
from finetune_api.v1alpha1 import FineTuneJob
from finetune_api.validation import parse_manifest
from finetune_operator import checkpoints
from finetune_operator.lifecycle import Outcome, State
from finetune_operator.render import owner_reference, render_checkpoint_claim, render_job
from finetune_operator.scrape import parse_metrics, resumed_at, resumed_from_step, stop_seconds
from finetune_operator.settings import Settings
from finetune_operator.status import Observed, plan
from finetune_operator.timings import unix

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:00:21Z"
HUB = {"repo": "org/out", "tokenSecretRef": {"name": "hf", "key": "token"}}


def ftj(nodes: int = 1, status: dict[str, Any] | None = None, **output: Any) -> FineTuneJob:
    doc: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ns", "generation": 1, "uid": "u1"},
        "spec": {
            "model": {"source": "hf://org/m"},
            "dataset": {"source": "hf://org/d"},
            "resources": {"nodes": nodes},
            "output": output,
        },
    }
    if status is not None:
        doc["status"] = status
    return parse_manifest(doc)


@pytest.mark.parametrize(
    ("nodes", "output", "default_class", "kind", "claim", "branch"),
    [
        # The user's claim wins, whatever the gang's size.
        (
            4,
            {"checkpoints": {"persistentVolumeClaim": {"claimName": "mine"}}},
            False,
            "Volume",
            "mine",
            None,
        ),
        # One node: a claim of its own, from the default or the named class.
        (1, {}, True, "Volume", "demo-checkpoints", None),
        (
            1,
            {"checkpoints": {"storageClassName": "fast"}},
            False,
            "Volume",
            "demo-checkpoints",
            None,
        ),
        # One node, no class to make a claim from: the Hub branch, else nothing durable.
        (1, {"hub": HUB}, False, "HubBranch", None, "finetune-checkpoints"),
        (1, {}, False, "Ephemeral", None, None),
        # Several nodes cannot share a ReadWriteOnce claim: the Hub branch, else nothing.
        (2, {"hub": HUB}, True, "HubBranch", None, "finetune-checkpoints"),
        (2, {"hub": HUB, "checkpoints": {"hubBranch": "ckpt"}}, True, "HubBranch", None, "ckpt"),
        (2, {}, True, "Ephemeral", None, None),
    ],
)
def test_the_first_durable_store_is_chosen(
    nodes: int, output: dict, default_class: bool, kind: str, claim: str | None, branch: str | None
) -> None:
    store = checkpoints.choose(ftj(nodes, **output), default_class)
    assert (store.kind, store.claim_name, store.hub_branch) == (kind, claim, branch)
    assert store.owned_claim == (claim == "demo-checkpoints")
    assert store.durable == (kind != "Ephemeral")


def test_the_recorded_store_survives_a_change_of_cluster() -> None:
    """A store chosen for attempt 1 is kept: moving would strand the checkpoints written."""
    job = ftj(1)
    first = checkpoints.choose(job, default_storage_class=True)
    recorded = checkpoints.from_status(job, first.to_status())
    assert recorded == first
    assert checkpoints.from_status(job, {}) is None


def test_the_claim_is_owned_readwriteonce_and_sized_by_the_spec() -> None:
    job = ftj(1, checkpoints={"size": "3Gi", "storageClassName": "fast"})
    claim = render_checkpoint_claim(job, owner_reference("demo", "u1"))
    assert claim["metadata"]["name"] == "demo-checkpoints"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "3Gi"}},
        "storageClassName": "fast",
    }
    # Without a class the field is absent, so the API server fills in the default class.
    assert "storageClassName" not in render_checkpoint_claim(ftj(1), {})["spec"]


def _pod(job: FineTuneJob, store: checkpoints.CheckpointStore) -> dict[str, Any]:
    return render_job(job, owner_reference("demo", "u1"), 1, Settings(), store)["spec"]["template"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_pods_mount_the_store_and_rank0_is_told_the_branch(nodes: int) -> None:
    job = ftj(nodes, hub=HUB)
    for default_class in (True, False):
        store = checkpoints.choose(job, default_class)
        spec = _pod(job, store)["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "checkpoints")
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        if store.kind == "Volume":
            assert volume["persistentVolumeClaim"] == {"claimName": "demo-checkpoints"}
            assert pod.CHECKPOINT_HUB_BRANCH_ENV not in env
        else:
            assert volume == {"name": "checkpoints", "emptyDir": {}}
            assert env[pod.CHECKPOINT_HUB_BRANCH_ENV] == "finetune-checkpoints"


def test_status_says_where_checkpoints_are_and_warns_when_nowhere_durable() -> None:
    durable = plan(
        ftj(1),
        Observed(now=NOW, store=checkpoints.choose(ftj(1), default_storage_class=True)),
    )
    cond = next(c for c in durable.status["conditions"] if c["type"] == "CheckpointsDurable")
    assert (cond["status"], cond["reason"]) == ("True", Reason.CHECKPOINT_VOLUME)
    assert durable.status["checkpoints"] == {"store": "Volume", "claimName": "demo-checkpoints"}

    lost = plan(ftj(2), Observed(now=NOW, store=checkpoints.choose(ftj(2), True)))
    cond = next(c for c in lost.status["conditions"] if c["type"] == "CheckpointsDurable")
    assert (cond["status"], cond["reason"]) == ("False", Reason.NO_DURABLE_STORE)
    assert "output.hub" in cond["message"]
    assert (f"Not{ConditionType.CHECKPOINTS_DURABLE}", Reason.NO_DURABLE_STORE) in [
        t[:2] for t in lost.transitions
    ]


def test_a_restart_records_the_resume_step_the_steps_lost_and_its_duration() -> None:
    store = checkpoints.choose(ftj(1), default_storage_class=True)
    # Attempt 1 ran to step 57 (the last progress read) and failed; the operator restarts it.
    failed = Outcome(State.FAILED, attempt=1, uid="j1", reason=Reason.TRAINING_FAILED)
    running = {"phase": "Running", "attempts": 1, "progress": {"step": 57, "totalSteps": 90}}
    restart = plan(ftj(1, status=running), Observed(now=NOW, outcome=failed, store=store))
    assert restart.status["attempts"] == 2
    assert restart.status["checkpoints"]["lastRestartTime"] == NOW
    # Attempt 2 runs; rank 0 says it resumed from its checkpoint at step 50.
    again = Outcome(State.RUNNING, attempt=2, uid="j2", running_pods=1)
    observed = Observed(
        now=LATER,
        outcome=again,
        store=store,
        progress={"step": 50, "totalSteps": 90},
        resumed_from_step=50,
    )
    resumed = plan(ftj(1, status=restart.status), observed)
    ckpt = resumed.status["checkpoints"]
    assert (ckpt["resumedFromStep"], ckpt["attempt"], ckpt["stepsLost"]) == (50, 2, 7)
    assert resumed.restart_seconds == 21.0
    # Later passes of the same attempt neither count the loss again nor time it again.
    later = plan(ftj(1, status=resumed.status), observed)
    assert later.status["checkpoints"]["stepsLost"] == 7
    assert later.restart_seconds is None


def test_a_resume_of_the_same_attempt_records_its_resume_step() -> None:
    """runPolicy.suspend true then false: the Job's pods go (each saving at SIGTERM) and come
    back within the same attempt. Their resume step is recorded, and what it lost is counted,
    but it is no restart (nothing failed)."""
    store = checkpoints.choose(ftj(1), default_storage_class=True)
    before = {
        "phase": "Running",
        "attempts": 3,
        "progress": {"step": 12, "totalSteps": 40},
        "checkpoints": {"attempt": 3, "resumedFromStep": 8, "stepsLost": 1},
    }
    running = Outcome(State.RUNNING, attempt=3, uid="j3", running_pods=1)
    resumed = plan(
        ftj(1, status=before),
        Observed(now=LATER, outcome=running, store=store, resumed_from_step=14),
    )
    ckpt = resumed.status["checkpoints"]
    assert (ckpt["resumedFromStep"], ckpt["attempt"], ckpt["stepsLost"]) == (14, 3, 1)
    assert resumed.restart_seconds is None
    # Resumed from before the last step read (no SIGTERM checkpoint): the difference is lost.
    behind = plan(
        ftj(1, status=before),
        Observed(now=LATER, outcome=running, store=store, resumed_from_step=10),
    )
    assert behind.status["checkpoints"]["stepsLost"] == 3
    # The pods that were there all along keep reporting 8: nothing changes.
    same = plan(
        ftj(1, status=before),
        Observed(now=LATER, outcome=running, store=store, resumed_from_step=8),
    )
    assert same.status["checkpoints"] == {**before["checkpoints"], **store.to_status()}


def test_a_fresh_start_loses_nothing_and_is_not_a_restart() -> None:
    observed = Observed(
        now=NOW,
        outcome=Outcome(State.RUNNING, attempt=1, uid="j1", running_pods=1),
        store=checkpoints.choose(ftj(1), default_storage_class=True),
        resumed_from_step=0,
    )
    first = plan(ftj(1, status={"attempts": 1}), observed)
    assert first.status["checkpoints"]["resumedFromStep"] == 0
    assert first.status["checkpoints"]["stepsLost"] == 0
    assert first.restart_seconds is None


def test_an_attempt_no_scrape_saw_resume_records_the_step_its_result_reports() -> None:
    """A FineTuneJob made again on a kept claim finds the result a failed push left there and
    only pushes it, ending before any scrape: its result says where it resumed."""
    store = checkpoints.choose(ftj(1), default_storage_class=True)
    pushed = TrainerResult(status="Succeeded", steps=10, resumed_from_step=10)
    done = Outcome(State.SUCCEEDED, attempt=1, uid="j1", result=pushed)
    running = {"phase": "Running", "attempts": 1}
    ended = plan(ftj(1, status=running), Observed(now=NOW, outcome=done, store=store))
    ckpt = ended.status["checkpoints"]
    assert (ckpt["resumedFromStep"], ckpt["attempt"], ckpt["stepsLost"]) == (10, 1, 0)
    assert ended.restart_seconds is None
    # A resume a scrape recorded for the attempt stands: the result does not say it again.
    scraped = {**running, "checkpoints": {"attempt": 1, "resumedFromStep": 5, "stepsLost": 0}}
    later = plan(ftj(1, status=scraped), Observed(now=NOW, outcome=done, store=store))
    assert later.status["checkpoints"]["resumedFromStep"] == 5


def test_rank0s_resume_and_stop_gauges_are_scraped() -> None:
    text = "".join(
        f'# TYPE {name} gauge\n{name}{{rank="1"}} 9\n{name}{{rank="0"}} 40\n'
        for name in (pod.RESUMED_FROM_STEP_GAUGE, pod.STOP_SECONDS_GAUGE)
    )
    assert resumed_from_step(parse_metrics(text)) == 40
    assert stop_seconds(parse_metrics(text)) == 40.0
    assert resumed_from_step(parse_metrics("")) is None
    assert stop_seconds(parse_metrics("")) is None
    at = 'finetune_train_resumed_timestamp_seconds{rank="0"} 1767225685.5\n'
    assert resumed_at(parse_metrics(at)) == "2026-01-01T00:01:25Z"
    assert resumed_at(parse_metrics("")) is None


@pytest.mark.parametrize(
    ("spec", "status", "may"),
    [
        # One node, no claim of its own: the operator makes one (or will, once it has chosen).
        ({"resources": {"nodes": 1}}, {}, True),
        ({"resources": {"nodes": 1}}, {"checkpoints": {"store": "Volume"}}, True),
        # It chose a Hub branch or an emptyDir (no StorageClass to make a claim from).
        ({"resources": {"nodes": 1}}, {"checkpoints": {"store": "HubBranch"}}, False),
        ({"resources": {"nodes": 1}}, {"checkpoints": {"store": "Ephemeral"}}, False),
        # The user's claim, or a gang that cannot share a ReadWriteOnce claim.
        (
            {"output": {"checkpoints": {"persistentVolumeClaim": {"claimName": "mine"}}}},
            {},
            False,
        ),
        ({"resources": {"nodes": 2}}, {}, False),
    ],
)
def test_only_a_one_node_gang_without_a_claim_of_its_own_may_own_the_operators(
    spec: dict[str, Any], status: dict[str, Any], may: bool
) -> None:
    assert checkpoints.may_own_claim(spec, status) is may


def stop_plan(stop: float | None, status: dict[str, Any] | None = None, **job: Any) -> Any:
    """One pass over a running one-node gang whose rank 0 says a stop takes `stop` seconds;
    `job`: spec fields beside ftj(1)'s (template, resources), and the store kind."""
    store = job.pop("store", None)
    doc = ftj(1, status=status).model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"].update(job)
    manifest = parse_manifest(doc)
    running = Outcome(State.RUNNING, attempt=1, uid="j1", running_pods=1)
    chosen = store or checkpoints.choose(manifest, default_storage_class=True)
    return plan(manifest, Observed(now=NOW, outcome=running, store=chosen, stop_seconds=stop))


def saves_on_stop(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status["conditions"] if c["type"] == "SavesOnStop"), None)


def test_a_stop_that_outlasts_the_grace_period_warns_once_and_one_that_fits_says_so() -> None:
    # Rank 0's longest recent step and last save take 41.2 s; the pods have the default 30 s.
    slow = stop_plan(41.2)
    cond = saves_on_stop(slow.status)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", Reason.GRACE_PERIOD_TOO_SHORT)
    assert "about 42 s" in cond["message"] and "grace period of 30 s" in cond["message"]
    assert "spec.template.terminationGracePeriodSeconds" in cond["message"]
    assert "say 90" in cond["message"]
    assert [t[:2] for t in slow.transitions if t[1] == Reason.GRACE_PERIOD_TOO_SHORT] == [
        ("NotSavesOnStop", Reason.GRACE_PERIOD_TOO_SHORT)
    ]
    # The next scrape says the same: no second Event, though the seconds moved.
    again = stop_plan(43.0, status=slow.status)
    assert saves_on_stop(again.status)["reason"] == Reason.GRACE_PERIOD_TOO_SHORT
    assert not [t for t in again.transitions if t[1] == Reason.GRACE_PERIOD_TOO_SHORT]
    # The same estimate within a grace period of 120 s fits.
    fits = stop_plan(41.2, template={"terminationGracePeriodSeconds": 120})
    cond = saves_on_stop(fits.status)
    assert (cond["status"], cond["reason"]) == ("True", Reason.WITHIN_GRACE_PERIOD)
    assert "of 120 s" in cond["message"]


def test_saves_on_stop_waits_for_a_first_save_and_a_durable_store() -> None:
    # No save yet (no estimate scraped): nothing is claimed either way.
    assert saves_on_stop(stop_plan(None).status) is None
    # In an emptyDir a stop's checkpoint goes with the pod whatever the time: CheckpointsDurable
    # says so already.
    ephemeral = checkpoints.CheckpointStore("Ephemeral")
    assert saves_on_stop(stop_plan(41.2, store=ephemeral).status) is None


@pytest.mark.parametrize(
    ("policy", "phase", "kept"),
    [
        ({}, "Failed", True),
        ({}, "Succeeded", False),
        ({}, "Running", False),
        ({"whenFailed": "Delete"}, "Failed", False),
        ({"whenSucceeded": "Retain"}, "Succeeded", True),
        ({"whenSucceeded": "Retain"}, "Suspended", False),
    ],
)
def test_the_claim_outlives_an_ended_job_as_its_retention_policy_says(
    policy: dict[str, str], phase: str, kept: bool
) -> None:
    job = ftj(checkpoints={"claimRetentionPolicy": policy})
    assert checkpoints.retains_claim(job, phase) is kept


def _kept_claim(**meta: Any) -> dict[str, Any]:
    job = ftj(checkpoints={"size": "2Gi", "storageClassName": "fast"})
    claim = render_checkpoint_claim(job, owner_reference("demo", "u1"))
    labels = {**claim["metadata"]["labels"], "finetune.dev/retained-from": "u0"}
    claim["metadata"] = {**claim["metadata"], "ownerReferences": [], "labels": labels, **meta}
    return claim


def test_only_a_claim_released_for_a_job_of_the_same_name_is_adoptable() -> None:
    assert checkpoints.adoptable(_kept_claim(), "demo")
    assert checkpoints.retained_from(_kept_claim()) == "u0"
    assert not checkpoints.adoptable(_kept_claim(), "other")
    unmarked = _kept_claim()
    del unmarked["metadata"]["labels"]["finetune.dev/retained-from"]
    assert not checkpoints.adoptable(unmarked, "demo")
    # Still controlled by its FineTuneJob: nothing released it.
    owned = _kept_claim(ownerReferences=[owner_reference("demo", "u0")])
    assert not checkpoints.adoptable(owned, "demo")
    # Someone's own claim that happens to carry the label, without the operator's others.
    foreign = {"app": "x", "finetune.dev/retained-from": "u0"}
    assert not checkpoints.adoptable(_kept_claim(labels=foreign), "demo")


def test_a_kept_claim_is_reported_with_its_size_and_when_it_was_released() -> None:
    released, created = "2026-12-01T10:00:00Z", "2026-11-30T09:00:00Z"
    marks = checkpoints.retention_marks("u0", released)
    claim = _kept_claim(annotations=marks["annotations"], creationTimestamp=created)
    assert claim["metadata"]["labels"]["finetune.dev/retained-from"] == "u0"
    kept = checkpoints.retained_claim(claim)
    assert kept == checkpoints.RetainedClaim(
        namespace="ns",
        name="demo-checkpoints",
        job_name="demo",
        size_bytes=2.0 * 2**30,
        since=unix(released) or 0,
    )
    # Once bound, its capacity, which the provisioner may have rounded up.
    claim["status"] = {"phase": "Bound", "capacity": {"storage": "3Gi"}}
    assert (checkpoints.retained_claim(claim) or kept).size_bytes == 3.0 * 2**30
    # Released by an operator from before the annotation: since its creation, the earliest.
    del claim["metadata"]["annotations"]["finetune.dev/retained-at"]
    assert (checkpoints.retained_claim(claim) or kept).since == unix(created)
    # Adopted (the marks cleared, a controller again), or on its way out: not kept.
    cleared = checkpoints.retention_marks(None, None)
    assert cleared == {
        "labels": {"finetune.dev/retained-from": None},
        "annotations": {"finetune.dev/retained-at": None},
    }
    adopted = _kept_claim(ownerReferences=[owner_reference("demo", "u1")])
    assert checkpoints.retained_claim(adopted) is None
    assert checkpoints.retained_claim(_kept_claim(deletionTimestamp=released)) is None


@pytest.mark.parametrize(
    ("held", "size", "expand"),
    [
        ("2Gi", "2Gi", False),
        ("2Gi", "3Gi", True),
        ("2147483648", "2Gi", False),
        ("3G", "2.9Gi", True),
    ],
)
def test_a_kept_claim_is_expanded_only_to_a_larger_size(held: str, size: str, expand: bool) -> None:
    claim = _kept_claim()
    claim["spec"]["resources"]["requests"]["storage"] = held
    assert checkpoints.needs_expansion(claim, ftj(checkpoints={"size": size})) is expand


def test_a_kept_claim_of_another_storage_class_is_refused_with_what_to_do() -> None:
    claim = _kept_claim()
    assert checkpoints.adoption_refused(claim, ftj()) is None  # no class named: any will do
    assert (
        checkpoints.adoption_refused(claim, ftj(checkpoints={"storageClassName": "fast"})) is None
    )
    refused = checkpoints.adoption_refused(claim, ftj(checkpoints={"storageClassName": "slow"}))
    assert refused is not None
    assert "is of StorageClass fast, not output.checkpoints.storageClassName slow" in refused
    assert "kubectl delete pvc demo-checkpoints" in refused


def test_a_storage_class_not_found_names_the_classes_there_are() -> None:
    said = checkpoints.class_not_found("fsat", {"standard": True, "fast": False})
    assert said.startswith("StorageClass fsat (output.checkpoints.storageClassName) not found")
    assert "the cluster has fast, standard (default)." in said
    many = checkpoints.class_not_found("x", {f"c{i:02}": False for i in range(12)})
    assert "c09 and 2 more." in many
    assert "the cluster has none." in checkpoints.class_not_found("x", {})
