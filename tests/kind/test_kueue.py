"""runPolicy.queueName against the real Kueue controller, on kind.

    make test-kueue      # or: pytest -m kueue tests/kind/test_kueue.py -s

Kueue v0.17.0 is built from its Go module and installed from its own manifests (hack/kueue.sh);
a ResourceFlavor, a ClusterQueue and a LocalQueue admit the job. The FineTuneJob names the
LocalQueue: Kueue admits its Job (the operator never writes the Job's spec.suspend), the gang
trains, `runPolicy.suspend: true` deactivates the Workload and Kueue evicts it and suspends the
Job (the pods save a checkpoint on SIGTERM), and `suspend: false` activates it again: Kueue
admits it anew and the gang resumes from that checkpoint. The control-plane suite
(test_suspend.py) covers the same contract with a stand-in for Kueue's controller; this one
runs Kueue.

Left out of `make test` (the `kueue` mark, see conftest.py): the first build of Kueue takes
minutes on two cores.
"""

from __future__ import annotations

import functools
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kind_tools import poll as poll_every
from test_e2e import example_job, setup_hub

pytestmark = [pytest.mark.kind, pytest.mark.kueue]

Obj = dict[str, Any]
# Looked at every 1 s: Kueue moves in seconds.
poll = functools.partial(poll_every, every=1)
ROOT = Path(__file__).resolve().parents[2]
KUEUE = "kueue.x-k8s.io/v1beta2"
NAME = "queued"
FLAVOR, CLUSTER_QUEUE, LOCAL_QUEUE = "ft-default", "ft-cluster-queue", "ft-queue"


def queues(namespace: str) -> list[Obj]:
    """A flavor, a ClusterQueue with room for the gang (every resource its pods request, the
    cache's local storage included: Kueue admits nothing that asks for an uncovered one), and
    the namespace's LocalQueue."""
    quota = {"cpu": "32", "memory": "128Gi", "ephemeral-storage": "1Ti"}
    return [
        {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {
            "apiVersion": KUEUE,
            "kind": "ClusterQueue",
            "metadata": {"name": CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": k, "nominalQuota": v} for k, v in quota.items()
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": KUEUE,
            "kind": "LocalQueue",
            "metadata": {"name": LOCAL_QUEUE, "namespace": namespace},
            "spec": {"clusterQueue": CLUSTER_QUEUE},
        },
    ]


@pytest.fixture(scope="module")
def kueue(kube: Any) -> Iterator[str]:
    """Kueue installed in kueue-system while the module runs (the manifests' path); removed
    after, so that the shared cluster's later tests run without it."""
    manifests = subprocess.run(
        [str(ROOT / "hack" / "kueue.sh")], check=True, capture_output=True, text=True, timeout=3600
    ).stdout.strip()
    kube("apply", "--server-side", "--force-conflicts", "-f", manifests, timeout=300)
    kube(
        "-n", "kueue-system", "rollout", "status", "deployment/kueue-controller-manager",
        "--timeout=300s", timeout=330,
    )  # fmt: skip
    try:
        yield manifests
    finally:
        kube("delete", "-f", manifests, "--wait=false", "--ignore-not-found", check=False)


def test_a_queued_job_is_admitted_suspended_and_resumed_by_kueue(
    kube: Any, images: dict[str, str], operator_release: Obj, timing: Any, kueue: str
) -> None:
    ns = kube.create_namespace("kueue")
    try:
        # Kueue's webhooks take a moment to get their certificates: retry until one answers.
        poll("Kueue's webhooks", lambda: _applied(kube, queues(ns)), timeout=300)
        hub = setup_hub(kube, ns, f"kueuetok{secrets.token_hex(16)}", timing, images)
        job = example_job(ns, hub.endpoint, NAME)
        spec = job["spec"]
        spec["training"].update(maxSteps=60, checkpointEverySteps=5)
        spec["runPolicy"] = {"queueName": LOCAL_QUEUE}
        kube.apply(job, ns)

        def status() -> Obj:
            return kube.json("-n", ns, "get", "finetunejob", NAME).get("status") or {}

        def workload() -> Obj | None:
            items = kube.json("-n", ns, "get", f"workloads.{KUEUE.split('/')[0]}")["items"]
            return items[0] if items else None

        def condition(obj: Obj, type_: str) -> Obj:
            found = (obj.get("status") or {}).get("conditions") or []
            return next((c for c in found if c["type"] == type_), {})

        # Kueue made the Workload and admitted it; the operator never unsuspended the Job.
        admitted = poll(
            "Kueue to admit the Workload",
            lambda: w if (w := workload()) and condition(w, "Admitted").get("status") == "True"
            else None,
        )  # fmt: skip
        assert admitted["spec"].get("active", True) is True
        # Kueue unsuspended the Job: the field's manager is Kueue's, never the operator's.
        batch = kube.json("-n", ns, "get", "job", NAME, "--show-managed-fields")
        assert batch["spec"]["suspend"] is False
        managers = {
            m.get("manager")
            for m in batch["metadata"].get("managedFields") or []
            if '"f:suspend"' in json.dumps(m.get("fieldsV1") or {})
        }
        assert managers and "finetune-operator" not in managers, managers
        trained = poll(
            "training",
            lambda: s if ((s := status()).get("progress") or {}).get("step", 0) >= 3 else None,
        )
        assert trained["phase"] == "Running"

        # runPolicy.suspend goes through the Workload: Kueue evicts it and suspends the Job.
        kube(
            "-n", ns, "patch", "finetunejob", NAME, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": true}}}',
        )  # fmt: skip
        suspended = poll(
            "Suspended",
            lambda: s if (s := status()).get("phase") == "Suspended" else None,
        )
        step = (suspended.get("progress") or {}).get("step") or 0
        deactivated = workload()
        assert deactivated is not None and deactivated["spec"]["active"] is False
        assert condition(deactivated, "Evicted").get("reason") == "Deactivated", deactivated
        assert kube.json("-n", ns, "get", "job", NAME)["spec"]["suspend"] is True
        live = [
            p
            for p in kube.json("-n", ns, "get", "pods", "-l", f"finetune.dev/job-name={NAME}")[
                "items"
            ]
            if p["status"].get("phase") in ("Pending", "Running")
        ]
        assert live == [], [p["metadata"]["name"] for p in live]

        # suspend: false activates it; Kueue admits it again and the gang resumes.
        kube(
            "-n", ns, "patch", "finetunejob", NAME, "--type=merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}',
        )  # fmt: skip
        resumed = poll(
            "the resume",
            lambda: (
                s
                if ((s := status()).get("checkpoints") or {}).get("resumedFromStep", 0) >= step > 0
                else None
            ),
        )
        assert (workload() or {}).get("spec", {}).get("active") is True
        final = poll(
            "the job to finish",
            lambda: s if (s := status()).get("phase") in ("Succeeded", "Failed") else None,
        )
        assert final["phase"] == "Succeeded", final
        assert final["attempts"] == 1 and not final.get("disruptions"), final
        assert resumed["checkpoints"]["stepsLost"] <= spec["training"]["checkpointEverySteps"]
    finally:
        kube("delete", "namespace", ns, "--wait=false", check=False)
        kube("delete", "clusterqueue", CLUSTER_QUEUE, "--wait=false", check=False)
        kube("delete", "resourceflavor", FLAVOR, "--wait=false", check=False)


def _applied(kube: Any, objs: list[Obj]) -> bool | None:
    try:
        for obj in objs:
            kube.apply(obj, obj["metadata"].get("namespace"))
    except Exception:  # the webhook is not serving yet
        return None
    return True
