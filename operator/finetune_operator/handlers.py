"""kopf handlers: thin triggers for `Reconciler.reconcile`.

Handler ids are explicit because kopf turns them into annotation keys
(`finetune.dev/<id>`); renaming one later makes kopf re-handle every object.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from finetune_api.constants import GROUP, LABEL_JOB_NAME, PLURAL, VERSION, ConditionType, Phase
from finetune_api.v1alpha1 import IMMUTABLE_SPEC_FIELDS
from finetune_operator import kueue, naming
from finetune_operator.apply import MAX_REQUESTS, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import PassResult, Reconciler
from finetune_operator.requeue import Requeue
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)
FTJ = (GROUP, VERSION, PLURAL)
# Read at import: timer intervals are fixed when the decorators run.
SETTINGS = Settings.from_env()
_state: dict[str, Reconciler] = {}
# Passes in flight at most: a few per request slot keep the client's pool busy. Unbounded, a
# burst of 2,000 objects starts 2,000 passes that each hold their body, model and rendered
# children while queueing for the pool, and all of them finish late; bounded, they wait before
# allocating anything and finish in arrival order.
MAX_PASSES = 4 * MAX_REQUESTS
# Periodic passes (resync, progress) get this many of those at most. Objects created together
# have their timers fire together; unbounded, a wave over thousands of objects would queue its
# requests ahead of a new object's first pass.
PERIODIC_PASSES = 4
_passes = asyncio.Semaphore(MAX_PASSES)
# Everything but spec.runPolicy (the one mutable section) is left out of kopf's diff-base.
DIFFBASE_IGNORED = ("metadata", *(f"spec.{f}" for f in IMMUTABLE_SPEC_FIELDS))
# A FineTuneJob waiting on something it cannot watch (a Secret, the garbage collection of a
# predecessor's child) is looked at again this often.
WAITING_SECONDS = 10.0
_periodic = asyncio.Semaphore(PERIODIC_PASSES)
_requeue = Requeue()


def reconciler() -> Reconciler:
    if "r" not in _state:
        _state["r"] = Reconciler(Kube(), SETTINGS, OperatorMetrics())
    return _state["r"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Decided once: kopf's bookkeeping lives in annotations under our own prefix, never in status
    # (the status schema is declared and pruned), and the keys never change.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    # The diff-base is kopf's copy of what it last handled, in an annotation. Only the update
    # handler of spec.runPolicy reads a diff, and the rest of the spec is immutable (CEL), so
    # the copy keeps runPolicy alone: a whole copy of a large spec (a big template.env) would
    # push the annotations past their 256 kB limit, and then kopf could not even remove its
    # finalizer, leaving the FineTuneJob undeletable.
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration", ignored_fields=DIFFBASE_IGNORED
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    # Watches can die silently; bounded timeouts make kopf reconnect instead of waiting forever.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.execution.max_workers = 8
    reconciler().metrics.serve(SETTINGS.metrics_port)


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    _requeue.close()
    await reconciler().kube.close()


async def _reconcile(
    namespace: str,
    name: str,
    *,
    periodic: bool = False,
    scrape: bool = False,
    children: bool = True,
) -> PassResult | None:
    """One pass, once the semaphores admit it (periodic ones through both, always in that order),
    and the follow-up pass it asks for."""
    if periodic:
        async with _periodic, _passes:
            result = await reconciler().reconcile(namespace, name, scrape=scrape, children=children)
    else:
        async with _passes:
            result = await reconciler().reconcile(namespace, name, scrape=scrape, children=children)
    after = result.plan.requeue_after if result is not None else None
    _requeue.schedule((namespace, name), after, functools.partial(follow_up, namespace, name))
    return result


async def follow_up(namespace: str, name: str) -> None:
    """The pass an earlier one asked for (`Plan.requeue_after`): pods that have not started."""
    await _reconcile(namespace, name, periodic=True, children=False)


async def _run(namespace: str, name: str, scrape: bool = False) -> None:
    outcome = await _reconcile(namespace, name, scrape=scrape)
    if outcome is None:
        return
    if outcome.permanent:
        raise kopf.PermanentError(outcome.permanent)
    # A wait (outcome.temporary) is not raised: kopf would post an Error Event on every retry.
    # The status says what is missing, one Warning Event says it once, and the `waiting`
    # timer retries.


@kopf.on.resume(*FTJ, id="reconcile")
@kopf.on.create(*FTJ, id="reconcile")
async def reconcile_ftj(namespace: str, name: str, **_: Any) -> None:
    # With a scrape: after an operator restart, a training gang's progress is read at once rather
    # than when the progress timer first fires. A new object has no pods, so nothing to read.
    await _run(namespace, name, scrape=True)


@kopf.on.update(*FTJ, field="spec.runPolicy", id="run-policy")
async def run_policy_changed(namespace: str, name: str, **_: Any) -> None:
    await _run(namespace, name)


@kopf.on.update(*FTJ, field="spec.serve", id="serve")
async def serve_changed(namespace: str, name: str, **_: Any) -> None:
    """spec.serve added, changed (a rollout) or removed (its Deployment and Service go)."""
    await _run(namespace, name)


# async although it does no I/O: kopf runs a sync handler in a thread, a hop on every event.
@kopf.on.event(*FTJ, id="forget")
async def forget(event: kopf.RawEvent, namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _requeue.cancel((namespace, name))
        reconciler().forget(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_MANAGED_BY: naming.MANAGER}, id="job")
async def job_changed(event: kopf.RawEvent, labels: kopf.Labels, namespace: str, **_: Any) -> None:
    """A Job moved (or vanished): re-derive its FineTuneJob. Event handlers are not retried."""
    # ADDED while watching is this operator's own create, and the pass that created the Job
    # writes the status it caused (if that pass fails, kopf retries it). Re-deriving it again
    # was a third of the requests after a burst. Jobs found at start-up or after a re-list
    # arrive with type None and are reconciled.
    if event.get("type") == "ADDED":
        return
    owner = labels.get(LABEL_JOB_NAME)
    if owner:
        try:
            await _reconcile(namespace, owner, children=False)
        except ApiException as exc:
            # E.g. 403 while the namespace terminates; the resync timer tries again.
            log.warning("reconcile of %s/%s after a Job event: %s", namespace, owner, exc)
        except Exception:
            log.exception("reconcile of %s/%s after a Job event failed", namespace, owner)


@kopf.on.event(
    "apps",
    "v1",
    "deployments",
    labels={naming.LABEL_MANAGED_BY: naming.MANAGER, naming.LABEL_SERVED_JOB: kopf.PRESENT},
    id="serve-deployment",
)
async def serve_deployment_changed(
    event: kopf.RawEvent, labels: kopf.Labels, namespace: str, **_: Any
) -> None:
    """A serving Deployment's rollout moved: re-derive status.serve (a finished rollout gets its
    smoke request now, not at the next resync)."""
    if event.get("type") == "ADDED":
        return  # this operator's own create; the pass that made it wrote the status
    owner = labels.get(naming.LABEL_SERVED_JOB)
    if owner:
        try:
            await _reconcile(namespace, owner, children=False)
        except ApiException as exc:
            log.warning("reconcile of %s/%s after a Deployment event: %s", namespace, owner, exc)
        except Exception:
            log.exception("reconcile of %s/%s after a Deployment event failed", namespace, owner)


# No version: kopf watches the group's preferred one, as the operator reads it (kueue.py).
@kopf.on.event(
    group=kueue.GROUP,
    plural=kueue.PLURAL,
    labels={kueue.LABEL_JOB_UID: kopf.PRESENT},
    id="workload",
)
async def workload_changed(body: kopf.Body, namespace: str, **_: Any) -> None:
    """Kueue made, admitted, evicted or (de)activated a queued Job's Workload: re-derive its
    FineTuneJob, whose status reports that (and whose suspend deactivates a new Workload at
    once). Changes a Job does not show, such as why Kueue has not admitted it, arrive only here.
    Other Jobs' Workloads cost no request. Without Kueue, kopf warns once that the resource is
    not served, and starts watching should the CRD appear."""
    owner = kueue.finetunejob_of(dict(body))
    if owner:
        try:
            await _reconcile(namespace, owner, children=False)
        except ApiException as exc:
            log.warning("reconcile of %s/%s after a Workload event: %s", namespace, owner, exc)
        except Exception:
            log.exception("reconcile of %s/%s after a Workload event failed", namespace, owner)


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == Phase.RUNNING


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    """Neither Succeeded nor Failed: a filter that, once false, stays false.

    A timer's filter must not turn false and then true again. kopf stops the timer when it
    turns false; if it turns true again before that timer's task has ended (its pass was still
    waiting for the object's lock), kopf spawns no new one, and none ever comes: a gang that
    went Running -> Restarting -> Running that way was never read again, for its whole attempt.
    """
    return status.get("phase") not in (Phase.SUCCEEDED, Phase.FAILED)


def _waiting(status: kopf.Status, **_: Any) -> bool:
    """Not finished, and the Job is held back (Created=False) by something the pass found."""
    if status.get("phase") in (Phase.SUCCEEDED, Phase.FAILED):
        return False
    return any(
        c.get("type") == ConditionType.CREATED and c.get("status") == "False"
        for c in status.get("conditions") or []
    )


@kopf.timer(*FTJ, id="waiting", interval=WAITING_SECONDS, when=_waiting)
async def waiting(namespace: str, name: str, **_: Any) -> None:
    await _reconcile(namespace, name, periodic=True)


@kopf.timer(
    *FTJ, id="progress", interval=SETTINGS.progress_seconds, initial_delay=5, when=_unfinished
)
async def progress(namespace: str, name: str, status: kopf.Status, **_: Any) -> None:
    # Only a Running gang has progress to read; the others cost no request (see _unfinished).
    if _running(status):
        await _reconcile(namespace, name, periodic=True, scrape=True, children=False)


@kopf.timer(*FTJ, id="resync", interval=SETTINGS.resync_seconds, initial_delay=30)
async def resync(namespace: str, name: str, **_: Any) -> None:
    """Lost watch events (kopf#1276, #955) would otherwise leave status stale forever."""
    await _reconcile(namespace, name, periodic=True)
