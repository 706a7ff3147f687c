"""A running FineTuneJob deleted and made again with another output repo, on kind with real pods:
with `claimRetentionPolicy.whenDeleted: Retain` nothing it trained is lost.

    pytest -m "kind and extended" -s tests/kind/test_delete_and_remake.py     # or: make test-all

One one-node job (examples/tiny-cpu.yaml) that saves only at its last step (checkpointEverySteps
above maxSteps), so a checkpoint before it can only be the one its pod writes at SIGTERM. While
it trains, `kubectl delete` deletes it: the FineTuneJob stays (the operator's finalizer) until
its gang has stopped and saved, and its claim outlives it. Made again under the same name with
another `output.hub.repo` (what the immutable spec makes you delete for), it adopts the claim,
resumes from the step the deleted one saved at, and pushes to the new repo.

In the `extended` mark: tests/controlplane/test_checkpoints.py proves the operator's part on a
real API server in `make test`, and the trainer suite the save at SIGTERM.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import pytest
from kind_tools import poll
from test_e2e import example_job, setup_hub

pytestmark = [pytest.mark.kind, pytest.mark.extended]

Obj = dict[str, Any]
NAME = "remade"
STEPS = 80
TRAINED_BEFORE_DELETE = 5
FINISHED = ("Succeeded", "Failed")


def held(ftj: Obj | None) -> Obj | None:
    """The FineTuneJob once the operator holds its finalizer."""
    meta = (ftj or {}).get("metadata") or {}
    return ftj if "finetune.dev/finalizer" in (meta.get("finalizers") or []) else None


def test_a_running_job_deleted_and_made_again_resumes_from_its_sigterm_checkpoint(
    kube: Any, images: dict[str, str], operator_release: Obj, timing: Any
) -> None:
    ns = kube.create_namespace("remade")
    try:
        hub = setup_hub(kube, ns, f"remadetok{secrets.token_hex(16)}", timing, images)
        job = example_job(ns, hub.endpoint, NAME)
        spec = job["spec"]
        spec["resources"]["nodes"] = 1
        del spec["template"]["affinity"]
        spec["training"].update(maxSteps=STEPS, checkpointEverySteps=STEPS + 1)
        spec["output"]["checkpoints"] = {"claimRetentionPolicy": {"whenDeleted": "Retain"}}
        kube.apply(job, ns)

        def ftj() -> Obj | None:
            got = kube("-n", ns, "get", "finetunejob", NAME, "--ignore-not-found", "-o", "json")
            return json.loads(got) if got.strip() else None

        def step() -> int:
            return int(((ftj() or {}).get("status") or {}).get("progress", {}).get("step") or 0)

        first = poll("the finalizer on the running job", lambda: held(ftj()))
        at_delete = poll(
            f"{TRAINED_BEFORE_DELETE} steps trained",
            lambda: s if (s := step()) >= TRAINED_BEFORE_DELETE else None,
        )
        t0 = time.monotonic()
        kube("-n", ns, "delete", "finetunejob", NAME, "--wait=true", "--timeout=300s", timeout=330)
        deleted_after = time.monotonic() - t0
        claim = kube.json("-n", ns, "get", "pvc", f"{NAME}-checkpoints")
        assert not claim["metadata"].get("ownerReferences"), claim["metadata"]
        labels = claim["metadata"]["labels"]
        assert labels["finetune.dev/retained-from"] == first["metadata"]["uid"], labels

        # Made again to push elsewhere: the spec is immutable, so this is how a repo is fixed.
        spec["output"]["hub"]["repo"] = f"org/{NAME}-fixed"
        t1 = time.monotonic()
        kube.apply(job, ns)
        final = poll(
            "the job made again to finish",
            lambda: (
                f if (f := ftj()) and (f.get("status") or {}).get("phase") in FINISHED else None
            ),
        )
        remade_after = time.monotonic() - t1
        st = final["status"]
        assert st["phase"] == "Succeeded", st
        assert final["metadata"]["uid"] != first["metadata"]["uid"]
        resumed = st["checkpoints"]["resumedFromStep"]
        # Saved at SIGTERM: at or past the step the operator read before the delete, short of
        # the end, and no periodic checkpoint was due.
        assert at_delete <= resumed < STEPS, (at_delete, resumed)
        assert st["attempts"] == 1 and st["checkpoints"].get("stepsLost", 0) == 0, st
        assert st["result"]["repo"] == f"org/{NAME}-fixed", st["result"]
        adopted = kube.json("-n", ns, "get", "pvc", f"{NAME}-checkpoints")
        assert adopted["metadata"]["uid"] == claim["metadata"]["uid"]
        timing.record("remade_delete_seconds", round(deleted_after, 1))
        timing.record("remade_resumed_from_step", f"{resumed} (step {at_delete} read before)")
        timing.record("remade_apply_to_succeeded", round(remade_after, 1))
    finally:
        kube("delete", "namespace", ns, "--wait=false", check=False)
