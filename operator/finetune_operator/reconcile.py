"""One reconcile pass: read → plan → act → write status → post Events.

Every trigger (create/resume/update, a Job event, the progress timer, the resync timer) ends up
here with the FineTuneJob's body. A per-object lock keeps two triggers from interleaving, and the
pass always re-derives status at its end, because kopf does not retry event handlers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from finetune_api.constants import KIND, ConditionType, Phase, Reason
from finetune_api.v1alpha1 import FineTuneJob, FineTuneJobStatus
from finetune_api.validation import ManifestError, parse_manifest
from finetune_operator import (
    checkpoints,
    claims,
    kueue,
    naming,
    render,
    scrape,
    serve,
    serve_status,
)
from finetune_operator.apply import (
    ApplyRejected,
    Kube,
    QuotaExceeded,
    SecretCheck,
    controlled_by,
)
from finetune_operator.checkpoints import CheckpointStore
from finetune_operator.lifecycle import (
    STUCK_REASONS,
    SUCCESSFUL_CREATE,
    Outcome,
    State,
    needs_created_events,
    needs_events,
    nodes_to_read,
    observe_job,
)
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.serve_status import ServeReason
from finetune_operator.settings import WAITING_SECONDS, Settings
from finetune_operator.smoke import chat_smoke
from finetune_operator.status import TERMINAL, Blocker, Observed, Plan, invalid_status, plan

log = logging.getLogger(__name__)
Obj = dict[str, Any]
# Attempt states whose Kueue Workload matters (a finished Job's Workload is only a record).
LIVE = (State.SUSPENDED, State.PENDING, State.RUNNING)
# Transitions worth a Warning Event besides Failed: each needs someone to act (or explains why
# pods are going away). One Event per transition, never one per pass.
WARNING_REASONS = frozenset(
    {
        Reason.RESTARTING,
        Reason.POD_STUCK_TERMINATING,
        Reason.NODE_NOT_READY,
        Reason.SECRET_NOT_FOUND,
        Reason.STORAGE_CLASS_NOT_FOUND,
        Reason.QUOTA_EXCEEDED,
        Reason.NAME_CONFLICT,
        Reason.NO_DURABLE_STORE,
        Reason.GRACE_PERIOD_TOO_SHORT,
        *STUCK_REASONS,
        *serve_status.WARNING_REASONS,
    }
)
# The type of the Events about serving (status.serve has no condition list of its own).
SERVE_EVENT_TYPE = "Serve"


@dataclass(frozen=True)
class PassResult:
    """What one reconcile pass planned, and what the kopf handler should raise about it."""

    plan: Plan
    # Set when the caller should raise kopf.TemporaryError / PermanentError.
    temporary: str | None = None
    permanent: str | None = None


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normal(status: Obj) -> Obj:
    return FineTuneJobStatus.model_validate(status).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )


class Reconciler:
    def __init__(self, kube: Kube, settings: Settings, metrics: OperatorMetrics) -> None:
        self.kube, self.settings, self.metrics = kube, settings, metrics
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self.metrics.observe_phase((namespace, name), None)

    async def reconcile(
        self,
        namespace: str,
        name: str,
        *,
        scrape: bool = False,
        children: bool = True,
        serve: bool = True,
    ) -> PassResult | None:
        """One pass over the freshest copy of the object; None when it no longer exists.

        The body is re-read inside the lock: a trigger's copy may predate the previous pass's
        status write, and planning from a stale attempt counter could recreate an old attempt.
        `children=False` (Job events, progress) skips re-applying the ConfigMap and Service
        while a Job exists: they cannot have changed, and at scale those writes dominate.
        `serve=False` (events of the Job or its pods, progress, follow-ups) leaves the serving
        Deployment unread once it is made: its own events ask for the passes that read it.
        """
        started = time.perf_counter()
        async with self._locks[(namespace, name)]:
            try:
                body = await self.kube.get_finetunejob(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    # Deleted, or being deleted (a finalizer holds it: keep_claim): a pass
                    # would make the Job its deletion is stopping again.
                    return None
                return await self._reconcile(body, scrape, children, serve)
            except Exception as exc:
                self.metrics.reconcile_errors.labels(kind=type(exc).__name__).inc()
                raise
            finally:
                self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def keep_claim(self, namespace: str, name: str, wait: bool) -> str | None:
        """The deletion of a FineTuneJob that keeps its claim (whenDeleted: Retain) before it
        ended: claims.release_deleted, under the FineTuneJob's lock. What it still waits for,
        or None once done."""
        async with self._locks[(namespace, name)]:
            body = await self.kube.get_finetunejob(namespace, name)
            if body is None:
                return None
            try:
                job = parse_manifest(body)
            except ManifestError:
                return None  # an invalid spec never made a claim
            store = await self._checkpoint_store(job)
            now = now_rfc3339()
            return await claims.release_deleted(self.kube, body, job, store, now, wait)

    async def _blocker(
        self, job: FineTuneJob, store: CheckpointStore, first: bool
    ) -> Blocker | None:
        """What keeps the job's first Job from being made, checked before it is: a Secret the
        pods would read, or the StorageClass its claim names, that does not exist. `first`: no
        attempt was recorded yet (the claim is made then)."""
        # Every Hub token the pods read (the push token, then the sources' read tokens).
        for token in job.spec.token_secrets():
            ref = token.ref
            found = await self.kube.secret_key_exists(job.metadata.namespace, ref.name, ref.key)
            if found is SecretCheck.NO_SECRET:
                message = f"Secret {ref.name} ({token.field}) not found"
                return Blocker(Reason.SECRET_NOT_FOUND, message)
            if found is SecretCheck.NO_KEY:
                message = f"Secret {ref.name} has no key {ref.key!r} ({token.field})"
                return Blocker(Reason.SECRET_NOT_FOUND, message)
        # PRESENT, or UNKNOWN (no RBAC to read Secrets): create the Job; the kubelet refuses a
        # pod whose Secret is missing, and the pod says so.
        wanted = job.spec.output.checkpoints.storage_class_name
        if first and store.owned_claim and wanted is not None:
            classes = await self.kube.storage_classes()
            if classes is not None and wanted not in classes:
                message = checkpoints.class_not_found(wanted, classes)
                return Blocker(Reason.STORAGE_CLASS_NOT_FOUND, message)
        return None

    async def _children(
        self, body: Obj, job: FineTuneJob, store: CheckpointStore, first: bool
    ) -> Blocker | None:
        """Create or update the ConfigMap and the two Services, and create the checkpoint claim the
        store owns; a Blocker when a name is taken. `first`: no attempt was recorded yet, so the
        children most likely do not exist."""
        uid = job.metadata.uid or ""
        owner = render.owner_reference(job.metadata.name, uid)
        manifests = [
            render.render_configmap(job, owner),
            render.render_service(job, owner),
            render.render_rendezvous_service(job, owner),
        ]
        # Side by side: independent objects, so a first pass costs one round trip, not four
        # (apply → Job latency, benchmarks/operator_scale.py).
        ensured = [self.kube.ensure(manifest, uid, create_first=first) for manifest in manifests]
        if store.owned_claim:
            claim = render.render_checkpoint_claim(job, owner)
            manifests.append(claim)
            ensured.append(claims.ensure(self.kube, body, job, claim, owner))
        for manifest, holder in zip(manifests, await asyncio.gather(*ensured), strict=True):
            if isinstance(holder, Blocker):
                return holder
            if holder is not None:
                return name_conflict(manifest["kind"], holder, job)
        return None

    async def _checkpoint_store(self, job: FineTuneJob) -> CheckpointStore:
        """The store recorded when the first Job was made, or the one to choose now."""
        if job.status is not None:
            recorded = job.status.checkpoints.model_dump(mode="json", by_alias=True)
            if (known := checkpoints.from_status(job, recorded)) is not None:
                return known
        default_class = False
        if checkpoints.needs_storage_class_check(job):
            classes = await self.kube.storage_classes()
            default_class = classes is None or any(classes.values())
        return checkpoints.choose(job, default_class)

    async def _workload(self, job: FineTuneJob, outcome: Outcome) -> kueue.Workload | None:
        """A queued live Job's Kueue Workload (None without queueName): one list request."""
        if not job.spec.run_policy.queue_name or outcome.state not in LIVE or outcome.deleting:
            return None
        lookup, found = await self.kube.find_workload(job.metadata.namespace, outcome.uid or "")
        return kueue.read(lookup, found)

    async def _observe(
        self, job: FineTuneJob, scrape_now: bool, store: CheckpointStore
    ) -> Observed:
        ns, name = job.metadata.namespace, job.metadata.name
        batch = await self.kube.get_job(ns, name)
        if batch is not None and not controlled_by(batch, job.metadata.uid or ""):
            # Not ours: never read as an attempt, never patched or deleted.
            blocker = name_conflict("Job", batch, job)
            return Observed(now=now_rfc3339(), blocker=blocker, store=store)
        pods = await self.kube.list_pods(ns, name, naming.attempt_of(batch)) if batch else []
        events: list[Obj] = []
        uid = ((batch or {}).get("metadata") or {}).get("uid") or ""
        finished = job.status is not None and job.status.phase in TERMINAL
        # One or the other: a Job short of pods runs; one whose attempt failed has ended.
        if batch is not None and needs_events(batch, pods):
            events = await self.kube.job_events(ns, uid, Reason.FAILED_CREATE)
        elif needs_created_events(batch, finished):
            events = await self.kube.job_events(ns, uid, SUCCESSFUL_CREATE)
        nodes = await self.kube.read_nodes(nodes_to_read(batch, pods))
        outcome = observe_job(batch, pods, events, nodes)
        workload = await self._workload(job, outcome)
        progress, resumed, resumed_at, stamps, stop = None, None, None, {}, None
        now = now_rfc3339()
        if scrape_now and outcome.state is State.RUNNING and outcome.rank0_ip:
            timeout = self.settings.scrape_timeout_seconds
            values, stamps = await scrape.scrape(outcome.rank0_ip, timeout)
            previous = (
                job.status.progress.model_dump(mode="json", by_alias=True) if job.status else None
            )
            progress = scrape.progress_from_metrics(values, previous, now)
            resumed, resumed_at = scrape.resumed_from_step(values), scrape.resumed_at(values)
            stop = scrape.stop_seconds(values)
        return Observed(
            now=now,
            job=batch,
            outcome=outcome,
            progress=progress,
            store=store,
            resumed_from_step=resumed,
            resumed_at=resumed_at,
            workload=workload,
            stamps=stamps,
            stop_seconds=stop,
        )

    async def _reconcile(
        self, body: Obj, scrape_now: bool, children: bool, serve: bool
    ) -> PassResult:
        try:
            job = parse_manifest(body)
        except ManifestError as exc:
            # The CRD admitted it, so Python and CEL disagree; say so rather than loop.
            return await self._fail_unparsable(body, str(exc))
        previous = _normal(body.get("status") or {})
        terminal = previous.get("phase") in (Phase.SUCCEEDED, Phase.FAILED)
        store = await self._checkpoint_store(job)
        observed = await self._observe(job, scrape_now, store)
        blocker, permanent = observed.blocker, None
        if terminal:
            blocker = None  # a finished job is never failed again for what it finds now
        elif blocker is None and (children or observed.outcome.state is State.ABSENT):
            first = not previous.get("attempts")
            blocker = await self._blocker(job, store, first)
            if blocker is None:
                try:
                    blocker = await self._children(body, job, store, first)
                except (ApplyRejected, QuotaExceeded) as exc:
                    blocker = refusal(exc)
        if blocker is not None and blocker.permanent:
            permanent = blocker.message
        observed = replace(observed, blocker=blocker)
        result = self._plan(job, observed)
        # The transitions of the statuses this pass carried forward (each plan's are relative to
        # the status before it).
        transitions: list[tuple[str, str, str]] = []
        for _ in range(3):  # act, then look again so this pass writes the status it caused
            if not result.actions:
                break
            try:
                created, refused = await self._act(job, result, store)
            except (ApplyRejected, QuotaExceeded) as exc:
                blocker = refusal(exc)
                permanent = blocker.message if blocker.permanent else permanent
                observed = replace(observed, blocker=blocker)
                result = self._plan(job, observed)
                break
            if not refused:  # a refused change did not happen: plan again from before it
                status = FineTuneJobStatus.model_validate(result.status)
                job = job.model_copy(update={"status": status})
                transitions = result.transitions
            if created is not None:  # a Job just born has no pods: no need to read it back
                outcome = observe_job(created, [])
                workload = await self._workload(job, outcome)
                observed = Observed(
                    now=now_rfc3339(), job=created, outcome=outcome, store=store, workload=workload
                )
            else:
                observed = await self._observe(job, False, store)
                if observed.blocker is not None and not terminal:
                    # E.g. the create met someone else's Job made since this pass read the name.
                    blocker = observed.blocker
                    permanent = blocker.message if blocker.permanent else permanent
            if refused and observed.workload is not None:
                # Shown in the status, and not tried again in this pass.
                observed = replace(observed, workload=replace(observed.workload, refused=refused))
            result = self._plan(job, replace(observed, blocker=blocker))
            result = replace(result, transitions=transitions + result.transitions)
        result = await self._serve(job, result, look=serve)
        result = await claims.release_ended(self.kube, job, store, result, now_rfc3339())
        await self._write(body, previous, result)
        temporary = blocker.message if blocker and not blocker.permanent else None
        return PassResult(plan=result, temporary=temporary, permanent=permanent)

    def _plan(self, job: FineTuneJob, observed: Observed) -> Plan:
        return plan(
            job,
            observed,
            stuck_after=self.settings.stuck_terminating_seconds,
            node_lost_wait=self.settings.node_lost_wait_seconds,
        )

    async def _serve(self, job: FineTuneJob, result: Plan, look: bool) -> Plan:
        """spec.serve: once the job Succeeded, apply the serving Deployment and Service for the
        pushed revision, smoke-test a finished rollout, and put status.serve into the plan's
        status (written with the rest of it). Without spec.serve, remove what it served.
        `look=False` keeps status.serve as it is, unless nothing was applied for the revision
        to serve yet (the pass that saw the job succeed)."""
        ns, name, uid = job.metadata.namespace, job.metadata.name, job.metadata.uid or ""
        status = FineTuneJobStatus.model_validate(result.status)
        job = job.model_copy(update={"status": status})
        if not look and not serve_status.unapplied(job):
            return result
        if job.spec.serve is None:
            if status.serve is not None:
                for kind in ("Deployment", "Service"):
                    await self.kube.delete_owned(kind, ns, naming.serve_name(name), uid)
                await self.kube.patch_status(ns, name, {"serve": None})
                result.status.pop("serve", None)
            return result
        want = serve_status.target(job)
        rollout, smoke, blocked = None, None, None
        if want is not None:
            owner = render.owner_reference(name, uid)
            manifests = (
                serve.render_serve_deployment(
                    job, owner, self.settings, want.revision, want.artifact
                ),
                serve.render_serve_service(job, owner),
            )
            try:
                for manifest in manifests:
                    holder = await self.kube.ensure(manifest, uid)
                    if holder is not None:
                        message = name_conflict(manifest["kind"], holder, job).message
                        blocked = (ServeReason.NAME_CONFLICT, message)
                        break
            except ApplyRejected as exc:
                blocked = (ServeReason.ROLLOUT_FAILED, f"the API server refused it: {exc}")
            except QuotaExceeded as exc:
                blocked = (ServeReason.QUOTA_EXCEEDED, f"{exc}; made once the quota has room")
            if blocked is None:
                deployment = await self.kube.get_child("Deployment", ns, naming.serve_name(name))
                rollout = serve_status.read_rollout(deployment)
                before = result.status.get("serve")
                if serve_status.needs_smoke(before, want, rollout):
                    model, url = serve.served_model(job), serve.serve_url(job)
                    smoke = await chat_smoke(url, model, self.settings.serve_smoke_timeout_seconds)
        served = serve_status.derive(job, rollout, smoke, now_rfc3339(), blocked)
        before = result.status.get("serve") or {}
        if served is None:
            return result
        status_out = {**result.status, "serve": served}
        transitions = list(result.transitions)
        if served.get("reason") not in (before.get("reason"), ServeReason.WAITING):
            transitions.append((SERVE_EVENT_TYPE, served["reason"], served.get("message", "")))
        after = result.requeue_after
        if blocked is not None and blocked[0] is ServeReason.QUOTA_EXCEEDED:
            # Nothing it can watch says when the quota has room; a finished job has no other
            # periodic pass than the resync.
            after = min(after or WAITING_SECONDS, WAITING_SECONDS)
        return replace(result, status=status_out, transitions=transitions, requeue_after=after)

    async def _act(
        self, job: FineTuneJob, result: Plan, store: CheckpointStore
    ) -> tuple[Obj | None, str]:
        """Carry out the plan; returns the Job this pass created, if it created one, and the API
        server's refusal of a change to the Kueue Workload, if any."""
        ns, name = job.metadata.namespace, job.metadata.name
        created, refused = None, ""
        for action in result.actions:
            if action.kind == "create":
                owner = render.owner_reference(name, job.metadata.uid or "")
                manifest = render.render_job(job, owner, action.attempt, self.settings, store)
                if action.deadline is not None:
                    # What is left of the whole job's deadline, not the full runPolicy value.
                    manifest["spec"]["activeDeadlineSeconds"] = action.deadline
                created = await self.kube.create_job(manifest)
                if created is not None:
                    self.metrics.job_attempts.inc()
            elif action.kind == "delete":
                await self.kube.delete_job(ns, name, action.uid)
            elif action.kind == "patch":
                await self.kube.patch_job(ns, name, action.patch)
            elif action.kind == "activate" and action.name and action.uid:
                active = bool(action.patch["active"])
                answer = await self.kube.set_workload_active(ns, action.name, action.uid, active)
                refused = answer or refused
        return created, refused

    async def _write(self, body: Obj, previous: Obj, result: Plan) -> None:
        meta = body["metadata"]
        status = _normal(result.status)
        key = (meta["namespace"], meta["name"])
        if status != previous:
            await self.kube.patch_status(meta["namespace"], meta["name"], status)
        self.metrics.observe_job(key, status)
        self.metrics.observe_timings(previous, status)
        if status.get("phase") == Phase.RUNNING and previous.get("phase") != Phase.RUNNING:
            created = meta.get("creationTimestamp")
            if created:
                elapsed = datetime.now(UTC) - datetime.fromisoformat(created.replace("Z", "+00:00"))
                self.metrics.time_to_running.observe(max(elapsed.total_seconds(), 0.0))
        if result.restarted:
            self.metrics.observe_restart(previous, status)
        if result.restart_seconds is not None:
            self.metrics.restart_seconds.observe(result.restart_seconds)
        for type_, reason, message in result.transitions:
            if type_ == ConditionType.FAILED:
                self.metrics.jobs_failed.labels(reason=reason).inc()
            warning = type_ == ConditionType.FAILED or reason in WARNING_REASONS
            await self.kube.post_event(
                body, "Warning" if warning else "Normal", reason, message or type_
            )

    async def _fail_unparsable(self, body: Obj, message: str) -> PassResult:
        meta = body["metadata"]
        previous = body.get("status") or {}
        status = invalid_status(previous, meta.get("generation") or 0, now_rfc3339(), message)
        if previous.get("phase") != Phase.FAILED:
            await self.kube.patch_status(meta["namespace"], meta["name"], status)
            self.metrics.jobs_failed.labels(reason=Reason.INVALID_SPEC).inc()
            await self.kube.post_event(body, "Warning", Reason.INVALID_SPEC, message)
        return PassResult(plan=Plan(status=status, actions=[], transitions=[]), permanent=message)


def refusal(exc: ApplyRejected | QuotaExceeded) -> Blocker:
    """What keeps the job's children from being made when the API server refuses one: a
    ResourceQuota of the namespace, which the job waits out (looked at again every waiting
    interval, as the Job controller retries the pods a quota refuses), or a render the API server
    or an admission policy rejects, which ends it."""
    if isinstance(exc, QuotaExceeded):
        message = f"{exc}; created once the namespace's quota has room"
        return Blocker(Reason.QUOTA_EXCEEDED, message)
    return Blocker(Reason.APPLY_REJECTED, str(exc), permanent=True)


def name_conflict(kind: str, holder: Obj, job: FineTuneJob) -> Blocker:
    """The Blocker for a child name held by an object this FineTuneJob does not control.

    A child of a deleted FineTuneJob of the same name is garbage that the garbage collector is
    about to remove (its owner is gone), so the new one waits for it. Anything else fails the
    FineTuneJob: the object is someone else's, and it is left exactly as it is.
    """
    name = (holder.get("metadata") or {}).get("name", job.metadata.name)
    refs = (holder.get("metadata") or {}).get("ownerReferences") or []
    if any(
        r.get("controller") and r.get("kind") == KIND and r.get("name") == job.metadata.name
        for r in refs
    ):
        message = (
            f"{kind} {name} belongs to a deleted FineTuneJob of the same name; waiting for the "
            "garbage collector to remove it"
        )
        return Blocker(Reason.NAME_CONFLICT, message)
    message = (
        f"{kind} {name} already exists and is not controlled by this FineTuneJob, so it was "
        f"left untouched. Delete or rename the {kind}, or create the FineTuneJob under another "
        "name"
    )
    return Blocker(Reason.NAME_CONFLICT, message, permanent=True)
