"""`helm test` of the chart: does this release's operator reconcile a FineTuneJob?

    python -m finetune_operator.selftest --namespace NS [--timeout 60]

The chart's test Pod (templates/tests/) runs it from the operator image, as a user of the API
would, under a Role that may only create, read and delete FineTuneJobs in NS:

1. create a FineTuneJob with runPolicy.suspend, so that nothing is scheduled or downloaded;
2. wait until the operator has reconciled it: status.observedGeneration is its generation and
   the phase is Suspended, which the operator sets once it has made the Job (suspended), its
   Service and its ConfigMap under its own RBAC;
3. delete it and wait until it is gone (the operator removes its finalizer, where it holds one).

Exit 0, or 1 with what did not happen and what to check; the FineTuneJob is deleted either way.
It is a client of the API, not the operator, so it talks to the API server through the
`kubernetes` client itself rather than the operator's own layer (apply.py), whose writes carry
the operator's field manager.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_api.constants import GROUP, PLURAL, VERSION, Phase
from finetune_operator.apply import load_configuration

POLL_SECONDS = 0.5


class SelfTestFailed(Exception):
    """What did not happen, and what to check."""


def manifest(name: str, namespace: str) -> dict[str, Any]:
    """A valid FineTuneJob that stays suspended: its sources are never read."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/component": "helm-test"},
        },
        "spec": {
            "model": {"source": "hf://finetune-operator/helm-test"},
            "dataset": {"source": "hf://finetune-operator/helm-test"},
            "resources": {"nodes": 1},
            "runPolicy": {"suspend": True},
        },
    }


def run(
    api: client.CustomObjectsApi, namespace: str, timeout: float, say: Callable[[str], None]
) -> None:
    """Create, await and delete the test's FineTuneJob, saying each step as it is done.
    Raises SelfTestFailed."""
    name = f"helm-test-{secrets.token_hex(3)}"
    where = f"FineTuneJob {namespace}/{name}"
    api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest(name, namespace)
    )
    say(f"created {where} (runPolicy.suspend: true)")
    try:
        start = time.monotonic()
        status = _wait(lambda: _reconciled(api, namespace, name), timeout)
        if status is None:
            last = (_read(api, namespace, name) or {}).get("status") or "none"
            raise SelfTestFailed(
                f"the operator did not reconcile {where} within {timeout:g}s (status: {last}): "
                "check that the operator's pod is running, and its log, and that its "
                f"watchNamespaces include {namespace}"
            )
        say(
            f"reconciled in {time.monotonic() - start:.1f}s: phase {status['phase']}, "
            f"observedGeneration {status['observedGeneration']}"
        )
    finally:
        start = time.monotonic()
        _delete(api, namespace, name)
    if not _wait(lambda: _read(api, namespace, name) is None, timeout):
        finalizers = (_read(api, namespace, name) or {}).get("metadata", {}).get("finalizers")
        raise SelfTestFailed(
            f"{where} was not gone {timeout:g}s after its deletion (finalizers: {finalizers}): "
            "check the operator's log"
        )
    say(f"deleted in {time.monotonic() - start:.1f}s")


def _reconciled(api: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    """The status once the operator has reconciled the latest generation and suspended it; a
    Failed phase (the operator could not make its children) fails the test at once."""
    obj = _read(api, namespace, name)
    if obj is None:
        raise SelfTestFailed(f"FineTuneJob {namespace}/{name} disappeared before it was reconciled")
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        return None
    if status.get("phase") == Phase.FAILED:
        reasons = [f"{c['type']}: {c.get('message', '')}" for c in status.get("conditions", [])]
        raise SelfTestFailed(f"the operator failed FineTuneJob {namespace}/{name}: {reasons}")
    return status if status.get("phase") == Phase.SUSPENDED else None


def _read(api: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _delete(api: client.CustomObjectsApi, namespace: str, name: str) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _wait(check: Callable[[], Any], timeout: float) -> Any:
    """`check()`'s first truthy value within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        if value := check():
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", required=True, help="where to create the FineTuneJob")
    parser.add_argument(
        "--timeout", type=float, default=60, help="seconds to wait for each of reconcile, delete"
    )
    args = parser.parse_args(argv)
    api = client.CustomObjectsApi(client.ApiClient(load_configuration()))
    try:
        run(api, args.namespace, args.timeout, lambda line: print(line, flush=True))
    except SelfTestFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except ApiException as exc:
        said = f"{exc.status} {exc.reason}: {exc.body}"
        print(f"FAILED: the API server said {said}", file=sys.stderr, flush=True)
        return 1
    print("PASSED: the operator reconciles FineTuneJobs in " + args.namespace, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
