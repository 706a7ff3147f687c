"""kopf handlers: thin triggers for `Reconciler.reconcile`.

Handler ids are explicit because kopf turns them into annotation keys
(`finetune.dev/<id>`); renaming one later makes kopf re-handle every object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import kopf

from finetune_api.constants import GROUP, LABEL_JOB_NAME, PLURAL, VERSION, ConditionType, Phase
from finetune_api.v1alpha1 import IMMUTABLE_SPEC_FIELDS
from finetune_operator import checkpoints, clock, kueue, naming
from finetune_operator.apply import MAX_REQUESTS, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import PassResult, Reconciler
from finetune_operator.settings import WAITING_SECONDS, Settings
from finetune_operator.status import TERMINAL

log = logging.getLogger(__name__)
FTJ = (GROUP, VERSION, PLURAL)
SETTINGS = Settings.from_env()
_state: dict[str, Reconciler] = {}
_tasks: dict[str, asyncio.Task[None]] = {}
# Passes in flight at most: a few per request slot keep the client's pool busy. Unbounded, a
# burst of 2,000 objects starts 2,000 passes that each hold their body, model and rendered
# children while queueing for the pool, and all of them finish late; bounded, they wait before
# allocating anything and finish in arrival order.
MAX_PASSES = 4 * MAX_REQUESTS
# Periodic passes (the clock's: follow-up, waiting, progress, resync) get this many of those at
# most; unbounded, a resync over thousands of objects would queue its requests ahead of a new
# object's first pass.
PERIODIC_PASSES = 4
_passes = asyncio.Semaphore(MAX_PASSES)
# Everything but spec.runPolicy (the one mutable section) is left out of kopf's diff-base.
DIFFBASE_IGNORED = ("metadata", *(f"spec.{f}" for f in IMMUTABLE_SPEC_FIELDS))
# The annotation that holds kopf's diff-base: its record of the configuration it handled.
DIFFBASE_KEY = "last-handled-configuration"
_periodic = asyncio.Semaphore(PERIODIC_PASSES)
# A deleted FineTuneJob that keeps its claim waits this long at most for its gang to stop (the
# pods' grace period to save a checkpoint, and more), looking this often.
KEEP_CLAIM_WAIT_SECONDS = 600.0
KEEP_CLAIM_POLL_SECONDS = 3.0
_clock = clock.Clock(
    resync_seconds=SETTINGS.resync_seconds,
    progress_seconds=SETTINGS.progress_seconds,
    waiting_seconds=WAITING_SECONDS,
)
# Set when an event queues a pass, so the loop need not wait for its tick.
_wake = asyncio.Event()


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
        prefix=GROUP, key=DIFFBASE_KEY, ignored_fields=DIFFBASE_IGNORED
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    # Watches can die silently; bounded timeouts make kopf reconnect instead of waiting forever.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.execution.max_workers = 8


@kopf.on.startup()
async def start_clock(**_: Any) -> None:
    # On kopf's event loop, beside its watches; it fills as the watch events arrive.
    run = clock.run(_clock, queued, _wake)
    _tasks["clock"] = asyncio.get_running_loop().create_task(run)


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    if task := _tasks.pop("clock", None):
        task.cancel()
    await reconciler().kube.close()


async def _reconcile(
    namespace: str,
    name: str,
    *,
    periodic: bool = False,
    scrape: bool = False,
    children: bool = True,
    serve: bool = True,
    idle: Callable[[], bool] = lambda: False,
) -> PassResult | None:
    """One pass, once the semaphores admit it (periodic ones through both, always in that order)
    unless it is `idle` by then, and the follow-up pass it asks for (replacing any earlier one)."""
    async with contextlib.AsyncExitStack() as admitted:
        if periodic:
            await admitted.enter_async_context(_periodic)
        await admitted.enter_async_context(_passes)
        if idle():
            return None
        result = await reconciler().reconcile(
            namespace, name, scrape=scrape, children=children, serve=serve
        )
    if result is None:
        # Gone: e.g. a pass that a late event of a child queued after the deletion.
        _forget(namespace, name)
        return None
    after = result.plan.requeue_after
    _clock.follow_up((namespace, name), after, asyncio.get_running_loop().time())
    return result


def _forget(namespace: str, name: str) -> None:
    """Drop what the operator keeps for a FineTuneJob that is gone: its queue entry, its lock and
    its phase series."""
    _clock.forget((namespace, name))
    reconciler().forget(namespace, name)


async def queued(due: clock.Due) -> None:
    """A pass from the queue: an event's, or the clock's (a follow-up, a wait, a progress read
    or a resync)."""
    await _reconcile(
        *due.key,
        periodic=due.periodic,
        scrape=due.scrape,
        children=due.children,
        serve=due.serve,
        idle=lambda: _clock.idle(due),
    )


def _queue(namespace: str, name: str, *, serve: bool = False) -> None:
    """Queue a pass of the FineTuneJob; events that come together make one. `serve`: its
    serving Deployment moved, so the pass reads that rollout."""
    _clock.soon((namespace, name), asyncio.get_running_loop().time(), serve=serve)
    _wake.set()


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
async def reconcile_ftj(
    status: kopf.Status, spec: kopf.Spec, namespace: str, name: str, **_: Any
) -> None:
    if _finished(status) and not spec.get("serve"):
        # Found at start-up: nothing changes a finished FineTuneJob but an edit (which has a
        # handler of its own) or its deletion, so it is only counted. A pass each would queue
        # 2-3 requests per finished job ahead of the live jobs' passes, and after a restart with
        # a long history a failed gang would wait that long to be seen. Its resync pass comes.
        reconciler().metrics.observe_job((namespace, name), status)
        return
    # With a scrape: after an operator restart, a training gang's progress is read at once rather
    # than when the progress timer first fires. A new object has no pods, so nothing to read.
    await _run(namespace, name, scrape=True)


def _keeps_claim_if_deleted(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """The FineTuneJobs kopf holds its finalizer on: those whose deletion must first keep their
    checkpoint claim (claimRetentionPolicy.whenDeleted: Retain), that have not ended (an ended
    one's claim went as whenFailed or whenSucceeded said, so deleting it waits for nothing),
    and whose checkpoints are on a claim the operator makes (the policy says nothing of any
    other store, and a finalizer would only make their deletion wait for an operator). kopf
    adds and removes the finalizer as this changes."""
    output = spec.get("output") or {}
    policy = (output.get("checkpoints") or {}).get("claimRetentionPolicy") or {}
    return (
        policy.get("whenDeleted") == "Retain"
        and status.get("phase") not in TERMINAL
        and checkpoints.may_own_claim(spec, status)
    )


@kopf.on.delete(*FTJ, id="keep-claim", when=_keeps_claim_if_deleted)
async def keep_claim(namespace: str, name: str, runtime: timedelta, **_: Any) -> None:
    """A FineTuneJob deleted before it ended, which keeps its claim: its gang stops and saves,
    then its claim is released (Reconciler.keep_claim), and kopf removes the finalizer. Past
    KEEP_CLAIM_WAIT_SECONDS (counted from the handler's first start, across operator restarts)
    the claim is released without waiting for the gang: the pods left are on a lost node.

    The wait is a loop here rather than kopf's TemporaryError, which would log each look as an
    error and post it as an Event."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + KEEP_CLAIM_WAIT_SECONDS - runtime.total_seconds()
    said = None
    while waiting := await reconciler().keep_claim(namespace, name, loop.time() < give_up):
        if waiting != said:
            log.info("%s/%s: %s", namespace, name, said := waiting)
        await asyncio.sleep(KEEP_CLAIM_POLL_SECONDS)


@kopf.on.update(*FTJ, field="spec.runPolicy", id="run-policy")
async def run_policy_changed(namespace: str, name: str, **_: Any) -> None:
    await _run(namespace, name)


@kopf.on.update(*FTJ, field="spec.serve", id="serve")
async def serve_changed(namespace: str, name: str, **_: Any) -> None:
    """spec.serve added, changed (a rollout) or removed (its Deployment and Service go)."""
    await _run(namespace, name)


# async although it does no I/O: kopf runs a sync handler in a thread, a hop on every event.
@kopf.on.event(*FTJ, id="track")
async def track(
    event: kopf.RawEvent,
    status: kopf.Status,
    annotations: kopf.Annotations,
    namespace: str,
    name: str,
    **_: Any,
) -> None:
    """Every watch event of a FineTuneJob (the start-up listing's too) tells the clock what it
    needs: that the object exists, whether its gang runs, whether it waits."""
    if event.get("type") == "DELETED":
        _forget(namespace, name)
        return
    if f"{GROUP}/{DIFFBASE_KEY}" in annotations and not status:
        # kopf's record of a handled configuration on an object no pass has seen: a copy of
        # another one (`kubectl get -o yaml` applied again, a backup restored). kopf takes it
        # as handled already and runs no create handler, so it would wait for its resync.
        _queue(namespace, name)
    now = asyncio.get_running_loop().time()
    _clock.track(
        (namespace, name),
        running=_running(status),
        waiting=_waiting(status),
        finished=_finished(status),
        now=now,
    )


@kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_MANAGED_BY: naming.MANAGER}, id="job")
async def job_changed(event: kopf.RawEvent, labels: kopf.Labels, namespace: str, **_: Any) -> None:
    """A Job moved (or vanished): its pods started, ended, or were replaced. Queued, not
    awaited: see `clock`."""
    # ADDED while watching is this operator's own create, and the pass that created the Job
    # writes the status it caused (if that pass fails, kopf retries it). Re-deriving it again
    # was a third of the requests after a burst. Jobs found at start-up or after a re-list
    # arrive with type None and are reconciled.
    if event.get("type") != "ADDED" and (owner := labels.get(LABEL_JOB_NAME)):
        _queue(namespace, owner)


@kopf.on.event(
    "",
    "v1",
    "persistentvolumeclaims",
    labels={naming.LABEL_MANAGED_BY: naming.MANAGER},
    id="claim",
)
async def claim_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str, name: str, **_: Any
) -> None:
    """A checkpoint claim of the operator's was made, released when its FineTuneJob ended,
    adopted by one made again, or deleted: the retained-claim series follow (metrics). No pass:
    each of those moves came from a pass, or from someone deleting a claim no job holds."""
    kept = None if event.get("type") == "DELETED" else checkpoints.retained_claim(dict(body))
    reconciler().metrics.observe_claim((namespace, name), kept)


def _unseen_by_its_job(status: kopf.Status, **_: Any) -> bool:
    """A pod not started yet, or a running one marked not ready: the node lifecycle controller
    marks a node's pods so once the node stops answering (`lifecycle._lost`)."""
    phase = status.get("phase")
    if phase in (None, "Pending"):
        return True
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return phase == "Running" and ready.get("status") == "False"


@kopf.on.event(
    "",
    "v1",
    "pods",
    labels={naming.LABEL_MANAGED_BY: naming.MANAGER},
    when=_unseen_by_its_job,
    id="pod",
)
async def pod_changed(event: kopf.RawEvent, labels: kopf.Labels, namespace: str, **_: Any) -> None:
    """A trainer pod changed in a way its Job does not show: one that has not started (the
    scheduler found no node for it, or the kubelet cannot pull its image or make its container:
    `Outcome.stuck`), or one whose node stopped answering (a failed attempt then waits to learn
    that: `Outcome.unheard`). Without this the operator would have to poll such pods. A pod
    that starts or ends changes its Job, and arrives there."""
    # ADDED: the Job controller made it, and the Job's own event (active +1) says so.
    if event.get("type") != "ADDED" and (owner := labels.get(LABEL_JOB_NAME)):
        _queue(namespace, owner)


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
    # ADDED: this operator's own create; the pass that made it wrote the status.
    if event.get("type") != "ADDED" and (owner := labels.get(naming.LABEL_SERVED_JOB)):
        _queue(namespace, owner, serve=True)


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
    if owner := kueue.finetunejob_of(dict(body)):
        _queue(namespace, owner)


def _finished(status: kopf.Status) -> bool:
    return status.get("phase") in TERMINAL


def _running(status: kopf.Status) -> bool:
    return status.get("phase") == Phase.RUNNING


def _waiting(status: kopf.Status) -> bool:
    """Not finished, and the Job is held back (Created=False) by something the pass found."""
    if _finished(status):
        return False
    return any(
        c.get("type") == ConditionType.CREATED and c.get("status") == "False"
        for c in status.get("conditions") or []
    )
