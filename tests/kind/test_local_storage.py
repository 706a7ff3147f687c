"""A pod whose /tmp volume outgrows `template.cacheSize`, on real kubelets: the job fails at once,
naming the field, instead of downloading into the same volume attempt after attempt.

    pytest -m "kind and extended" -s tests/kind/test_local_storage.py     # or: make test-all

The example job (two pods) with `cacheSize: 40Mi`: the base model it downloads into the Hugging
Face cache in /tmp is 83 MB. The kubelet's eviction manager measures the emptyDir (its volume
stats are up to a minute old) and evicts the pod, with no DisruptionTarget: the pod just fails,
and the Job with it. `maxSteps` is far more than the job could train before that happens.

In the `extended` mark (`make test-all`): tests/unit/test_status.py proves the operator's reading
of such a pod on the kubelet's own messages; this run is the real kubelet, in minutes.
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


def test_a_cache_volume_too_small_fails_the_job_at_once_naming_cache_size(
    kube: Any,
    images: dict[str, str],
    operator_release: dict[str, str],
    test_namespace: str,
    diagnostics: dict[str, str],
    timing: Any,
) -> None:
    ns = test_namespace
    diagnostics["namespace"] = ns
    hub = setup_hub(kube, ns, f"e2etok{secrets.token_hex(20)}", timing, images)
    job = example_job(ns, hub.endpoint, NAME)
    job["spec"]["template"]["cacheSize"] = "40Mi"
    job["spec"]["training"]["maxSteps"] = 4000
    job["spec"]["runPolicy"]["backoffLimit"] = 3
    t0 = time.monotonic()
    kube.apply(job, ns)
    ftj = wait_finished(kube, ns, NAME, WAIT_S)
    timing.record("local_storage_failed_after", time.monotonic() - t0)
    st = ftj["status"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert st["phase"] == "Failed" and failed["reason"] == "InvalidSpec", st
    assert failed["message"].startswith("spec.template.cacheSize: the kubelet evicted pod "), failed
    assert 'Usage of EmptyDir volume "tmp" exceeds the limit "40Mi".' in failed["message"], failed
    # At once: the budget of 3 retries is not spent on the same download.
    assert st["attempts"] == 1, st
    made = epoch(ftj["metadata"]["creationTimestamp"])
    timing.record("local_storage_created_to_failed", epoch(st["completionTime"]) - made)
