"""Pods that outgrow their local storage, on real kubelets: the job fails at once, naming the
field to raise, instead of downloading into the same volume attempt after attempt.

    pytest -m "kind and extended" -s tests/kind/test_local_storage.py     # or: make test-all

The example job (two pods), whose base model is 83 MB:
- with `cacheSize: 40Mi`, rank 0 refuses the download before it starts: the model alone is
  larger than the pod's /tmp may grow (the trainer's own check, from the Hub's file sizes);
- with room in /tmp but a pod `ephemeral-storage` limit of 50Mi, the download goes ahead and the
  kubelet's eviction manager evicts the pod once it measures the usage (volume stats up to a
  minute old). Such an eviction sets no DisruptionTarget, and the trainer saves on the kubelet's
  SIGTERM and exits 143, which the Job would replace: the operator reads the kubelet's message,
  fails the job and deletes its Job. `maxSteps` is far more than the job could train first.

In the `extended` mark (`make test-all`): tests/unit/test_source_commits.py and
tests/trainer/test_one_download.py prove the check on the trainer's side, tests/unit/test_status.py
the operator's reading of the kubelet's messages; this is the real kubelet, in a minute or two.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from kind_tools import epoch
from test_e2e import example_job, setup_hub, wait_finished

pytestmark = [pytest.mark.kind, pytest.mark.extended]

NAME = "cache-small"
WAIT_S = 420


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        (
            {"template": {"cacheSize": "40Mi"}},
            "spec.template.cacheSize: no space left for the model org/tiny ",
        ),
        (
            {
                "template": {"cacheSize": "200Mi"},
                "resources": {"limits": {"memory": "2Gi", "ephemeral-storage": "50Mi"}},
            },
            "spec.resources.limits: the kubelet evicted pod ",
        ),
    ],
    ids=["cache-size", "ephemeral-limit"],
)
def test_a_pod_that_outgrows_its_local_storage_fails_the_job_at_once(
    kube: Any,
    images: dict[str, str],
    operator_release: dict[str, str],
    test_namespace: str,
    diagnostics: dict[str, str],
    timing: Any,
    changes: dict[str, Any],
    said: str,
) -> None:
    ns = test_namespace
    diagnostics["namespace"] = ns
    hub = setup_hub(kube, ns, f"e2etok{secrets.token_hex(20)}", timing, images)
    job = example_job(ns, hub.endpoint, NAME)
    for section, fields in changes.items():
        job["spec"][section].update(fields)
    job["spec"]["training"]["maxSteps"] = 4000
    job["spec"]["runPolicy"]["backoffLimit"] = 3
    t0 = time.monotonic()
    kube.apply(job, ns)
    ftj = wait_finished(kube, ns, NAME, WAIT_S)
    case = "cache" if "cacheSize: no space" in said else "limit"
    timing.record(f"local_storage_{case}_failed_after", time.monotonic() - t0)
    st = ftj["status"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert st["phase"] == "Failed" and failed["reason"] == "InvalidSpec", st
    assert failed["message"].startswith(said), failed
    # At once: the budget of 3 retries is not spent on the same download.
    assert st["attempts"] == 1, st
    made = epoch(ftj["metadata"]["creationTimestamp"])
    timing.record(f"local_storage_{case}_created_to_failed", epoch(st["completionTime"]) - made)
