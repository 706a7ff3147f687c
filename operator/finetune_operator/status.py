"""`plan(job, observed)`: the next status and the actions that lead there. Pure.

Conditions are the truth (finetune_operator.conditions); what a pass decides is planned here, with
two parts in modules of their own: runPolicy.suspend (suspension) and gang restarts and resumes
(restarts). Re-deriving the same situation twice gives the same status, and the operator writes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_api.constants import ConditionType, Phase, Reason
from finetune_api.result import TrainerResult
from finetune_api.v1alpha1 import DEFAULT_BRANCH, FineTuneJob, RunPolicy
from finetune_operator import checkpoints, naming, timings
from finetune_operator.checkpoints import CheckpointStore
from finetune_operator.conditions import Conditions, phase_of, transitions
from finetune_operator.kueue import Lookup, Workload
from finetune_operator.lifecycle import STUCK_REASONS, Obj, Outcome, State, Stuck
from finetune_operator.restarts import (
    departed_unseen,
    node_not_ready,
    record_resume,
    replaced_before,
    replaced_unseen,
    restart_in_place,
    resume_in_result,
    with_restart,
)
from finetune_operator.settings import NODE_LOST_WAIT_SECONDS, STUCK_TERMINATING_SECONDS
from finetune_operator.suspension import resume, suspend, workload_patch
from finetune_operator.timings import later, seconds_between

CT = ConditionType
TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)
# While an attempt's pods have not all started and none is stuck yet, look again this often
# (nothing the operator watches changes when a pod starts failing to pull its image or to fit),
# and less often as the Job ages: a tenth of its age, up to the resync interval's default. Pods
# that wait on something with no reason to show (a scheduling gate, a slow provisioner) then
# cost a pass a minute, not six.
PENDING_CHECK_SECONDS = (10.0, 60.0)
# What to fix, by the reason a pod cannot start (the PendingTimeout message ends with it).
PENDING_HINTS = {
    Reason.IMAGE_PULL_BACK_OFF: "check that the image (spec.template.image, or the operator's "
    "trainer image) exists and that the nodes may pull it (imagePullSecrets of the pods' "
    "ServiceAccount)",
    Reason.ERR_IMAGE_NEVER_PULL: "the image is not on the node and its pull policy is Never",
    Reason.INVALID_IMAGE_NAME: "spec.template.image is not a valid image reference",
    Reason.CREATE_CONTAINER_CONFIG_ERROR: "create the Secret or ConfigMap (or the key) the pod "
    "references: output.hub.tokenSecretRef, model.tokenSecretRef, dataset.tokenSecretRef, or a "
    "valueFrom in spec.template.env",
    Reason.CREATE_CONTAINER_ERROR: "the container runtime could not create the container; see "
    "the message and the node's runtime",
    Reason.UNSCHEDULABLE: "no node fits the pod: check spec.resources (requests, accelerator), "
    "spec.template nodeSelector, tolerations and affinity, and that every claim the pod mounts "
    "exists and can bind",
    Reason.FAILED_CREATE: "the Job controller cannot create the pods: check that "
    "spec.template.serviceAccountName exists, and the namespace's ResourceQuota, LimitRange "
    "and admission policies",
}


# The reasons of a Blocker that the job waits out (Created=False, and Running=False with it).
BLOCKER_REASONS = frozenset(
    {
        Reason.SECRET_NOT_FOUND,
        Reason.STORAGE_CLASS_NOT_FOUND,
        Reason.QUOTA_EXCEEDED,
        Reason.NAME_CONFLICT,
    }
)
# Running's reasons that say why no pod runs, which pods on their way (PodsPending) replace.
_SUPERSEDED_BY_PODS = STUCK_REASONS | BLOCKER_REASONS


@dataclass(frozen=True)
class Blocker:
    """A problem found before the Job could be made."""

    reason: Reason
    message: str
    # Permanent: the FineTuneJob fails. Otherwise it waits (Created=False) and is retried.
    permanent: bool = False


@dataclass(frozen=True)
class Observed:
    """What the operator read from the cluster in one pass."""

    now: str
    job: Obj | None = None
    outcome: Outcome = field(default_factory=lambda: Outcome(State.ABSENT))
    progress: Obj | None = None
    blocker: Blocker | None = None
    store: CheckpointStore | None = None
    # What rank 0 of the running attempt reports: the step it resumed from (0: a fresh start),
    # and when (RFC 3339; None from a trainer that does not say).
    resumed_from_step: int | None = None
    resumed_at: str | None = None
    # A queued Job's Kueue Workload; None when not looked up (no queueName).
    workload: Workload | None = None
    # Rank 0's phase stamps as scraped (finetune_api.phases names, Unix seconds).
    stamps: dict[str, float] = field(default_factory=dict)
    # What rank 0 estimates a stop takes (its longest recent step and its last save), as
    # scraped; None before its first save or without a scrape.
    stop_seconds: float | None = None


@dataclass(frozen=True)
class Action:
    # "create" | "delete" | "patch" (the Job) | "activate" (the Kueue Workload `name`)
    kind: str
    attempt: int = 0
    uid: str | None = None
    name: str | None = None
    patch: Obj = field(default_factory=dict)
    # For "create": the Job's activeDeadlineSeconds, what is left of the whole job's budget.
    deadline: int | None = None


def _seconds(start: str, end: str) -> int:
    """Whole seconds from one RFC 3339 timestamp to another."""

    def parse(ts: str) -> datetime:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))

    return int((parse(end) - parse(start)).total_seconds())


def deadline_left(policy: RunPolicy, start_time: str | None, at: str) -> int | None:
    """Seconds left at `at` of runPolicy.activeDeadlineSeconds, which bounds the whole job: its
    clock starts at status.startTime (the first attempt running) and never restarts. None
    without a deadline; zero or less once it ran out."""
    total = policy.active_deadline_seconds
    if total is None:
        return None
    if not start_time:
        return total
    return total - max(_seconds(start_time, at), 0)


def job_started(spec_job: Obj) -> str | None:
    """When the Job's own clock started: the Job controller's status.startTime (reset by a
    resume, and by Kueue's admission), its creation before that."""
    meta, job_status = spec_job.get("metadata") or {}, spec_job.get("status") or {}
    return job_status.get("startTime") or meta.get("creationTimestamp")


def attempt_deadline(spec_job: Obj, policy: RunPolicy, start_time: str | None) -> int | None:
    """The activeDeadlineSeconds an attempt's Job should have: the budget left when its own
    clock started (`job_started`), so that the Job ends when the whole job's budget does. At
    least 1, the field's minimum: a Job with nothing left then fails DeadlineExceeded at once."""
    started = job_started(spec_job)
    # A Job read back without timestamps (never, from an API server) keeps the whole budget.
    left = deadline_left(policy, start_time if started else None, started or "")
    return None if left is None else max(left, 1)


def job_patch(spec_job: Obj, run_policy: RunPolicy, start_time: str | None = None) -> Obj:
    """The mutable Job fields that drifted from runPolicy (a merge patch), or {}."""
    spec = spec_job.get("spec") or {}
    want: Obj = {
        "activeDeadlineSeconds": attempt_deadline(spec_job, run_policy, start_time),
        # Never the Job's own (see _ttl_left): one an earlier version set is removed.
        "ttlSecondsAfterFinished": None,
    }
    # Kueue owns .spec.suspend of a queued Job; fighting it would evict the workload.
    if not run_policy.queue_name:
        want["suspend"] = bool(run_policy.suspend)
    return {k: v for k, v in want.items() if spec.get(k) != v and not (v is None and k not in spec)}


@dataclass(frozen=True)
class Plan:
    status: Obj
    actions: list[Action]
    # (type, reason, message) of conditions whose status changed: one Event each.
    transitions: list[tuple[str, str, str]]
    # Seconds from Restarting to the new attempt training, when this pass first saw it train.
    restart_seconds: float | None = None
    # Whether this pass saw a gang restart begin (a new attempt, or a pod replaced in place).
    restarted: bool = False
    # Look again after this many seconds even if nothing changes (pods that have not started:
    # a pod that gets stuck, or stays stuck until runPolicy.pendingTimeoutSeconds, moves no Job).
    requeue_after: float | None = None


def evaluation_summary(
    evaluation: dict[str, Obj], gates: dict[str, float], metrics: list[str]
) -> str | None:
    """The EVAL column: the first gated metric, else the first of evaluation.metrics. Not the
    first key of the status: the API server hands objects back with their keys sorted."""
    if not evaluation:
        return None
    ranked = [*gates, *metrics, *sorted(evaluation)]
    name = next(m for m in ranked if m in evaluation)
    before, after = evaluation[name].get("before"), evaluation[name].get("after")
    if before is not None and after is not None:
        return f"{name} {before:.4g}→{after:.4g}"
    value = after if after is not None else before
    return f"{name} {value:.4g}" if value is not None else name


def _pushed_message(result: TrainerResult) -> str:
    """repo@sha, and the pull request or the branch (other than main) it is on."""
    message = f"{result.repo}@{result.revision}"
    if result.pr_revision:
        return f"{message}, pull request {result.pr_revision} ({result.pr_url})"
    if result.branch and result.branch != DEFAULT_BRANCH:
        return f"{message} on branch {result.branch}"
    return message


def _apply_result(status: Obj, outcome: Outcome, conds: Conditions) -> None:
    result = outcome.result
    if result is None:
        return
    sources = {
        "modelRevision": result.model_revision,
        "datasetRevision": result.dataset_revision,
        "vaeRevision": result.vae_revision,
    }
    if any(sources.values()):
        status["sources"] = {k: v for k, v in sources.items() if v}
    if result.evaluation:
        status["evaluation"] = {name: s.model_dump() for name, s in result.evaluation.items()}
        conds.set(CT.EVALUATED, True, Reason.EVALUATED, ", ".join(result.evaluation))
    if result.revision:
        status["result"] = {
            "repo": result.repo,
            "revision": result.revision,
            "url": result.url,
            "artifact": result.artifact,
        }
        # Where the commit landed: its branch, or the pull request output.hub.createPr opened.
        where = {"branch": result.branch, "prRevision": result.pr_revision, "prUrl": result.pr_url}
        status["result"].update({k: v for k, v in where.items() if v})
        conds.set(CT.PUSHED, True, Reason.PUSHED, _pushed_message(result))
    if result.steps is not None or result.train_loss is not None:
        progress = dict(status.get("progress") or {})
        if result.steps is not None:
            progress["step"] = result.steps
            progress["totalSteps"] = max(progress.get("totalSteps") or 0, result.steps)
        if result.train_loss is not None:
            progress["loss"] = round(result.train_loss, 6)
        status["progress"] = progress


def _finish(status: Obj, conds: Conditions, now: str, ok: bool, reason: str, msg: str) -> None:
    conds.set(CT.RUNNING, False, reason, msg)
    conds.set(CT.SUCCEEDED if ok else CT.FAILED, True, reason, msg)
    if conds.by_type.get(CT.SUSPENDED, {}).get("status") == "True":
        conds.set(CT.SUSPENDED, False, reason, "finished")
    status["completionTime"] = status.get("completionTime") or now
    if ok:
        status["progress"] = {**(status.get("progress") or {}), "percent": 100, "etaSeconds": 0}


def _timings(status: Obj, prev: Obj, job: FineTuneJob, observed: Observed) -> None:
    """status.startup and status.finish of the observed attempt (timings.derive)."""
    out = observed.outcome
    stamps = {**observed.stamps, **(out.result.phases if out.result is not None else {})}
    status["startup"], status["finish"] = timings.derive(
        prev,
        created=job.metadata.creation_timestamp,
        attempt=out.attempt,
        pods=out.pod_times,
        stamps=stamps,
        finished_at=status.get("completionTime"),
    )


def plan(
    job: FineTuneJob,
    observed: Observed,
    *,
    stuck_after: float = STUCK_TERMINATING_SECONDS,
    node_lost_wait: float = NODE_LOST_WAIT_SECONDS,
) -> Plan:
    """The status and the actions of one pass. `stuck_after`: how long after its grace period
    a pod of a restarting attempt that is still there counts as stuck (_held_back).
    `node_lost_wait`: how long after an attempt failed a pod that has not reported its end may
    yet turn out lost with its node (_hearing_out)."""
    prev: Obj = (
        job.status.model_dump(mode="json", by_alias=True, exclude_none=True) if job.status else {}
    )
    generation = job.metadata.generation or 0
    conds = Conditions(prev.get("conditions") or [], observed.now, generation)
    status = _carried_over(job, observed, prev, conds)
    restart_seconds, rejoin = _record_resume(status, prev, conds, status["attempts"], observed)
    terminal = prev.get("phase") in TERMINAL and (
        conds.is_true(CT.SUCCEEDED) or conds.is_true(CT.FAILED)
    )
    if terminal:
        # A finished FineTuneJob never starts again; its Job goes when runPolicy's TTL is up.
        expiry, requeue_after = _expiry(job.spec.run_policy, status, observed.outcome, observed.now)
        step = _Step(expiry, requeue_after=requeue_after)
    else:
        step = _next_step(job, observed, status, prev, conds, stuck_after, node_lost_wait)
    requeue_after = _settle(job, observed, status, prev, conds, terminal, step.requeue_after)
    return Plan(
        status=status,
        actions=step.actions,
        transitions=with_restart(transitions(prev, status), rejoin or step.began),
        restart_seconds=restart_seconds,
        restarted=rejoin is not None or step.restarted,
        requeue_after=requeue_after,
    )


def _carried_over(job: FineTuneJob, observed: Observed, prev: Obj, conds: Conditions) -> Obj:
    """The status as this pass begins: the last one's, with what the pass knows before it
    decides anything (the generation, the children's names, the attempt, the store)."""
    name, out = job.metadata.name, observed.outcome
    status: Obj = {**prev, "observedGeneration": job.metadata.generation or 0}
    status["workload"] = {
        "jobName": naming.batch_job_name(name),
        "serviceName": naming.service_name(name),
    }
    attempts = max(int(prev.get("attempts") or 0), 1)
    if out.state is not State.ABSENT and out.attempt > attempts:
        attempts = out.attempt  # created, then crashed before the status write
    status["attempts"] = attempts
    if observed.store is not None:
        status["checkpoints"] = {**(prev.get("checkpoints") or {}), **observed.store.to_status()}
        conds.set(CT.CHECKPOINTS_DURABLE, *observed.store.condition())
    return status


def _next_step(
    job: FineTuneJob,
    observed: Observed,
    status: Obj,
    prev: Obj,
    conds: Conditions,
    stuck_after: float,
    node_lost_wait: float,
) -> _Step:
    """What an unfinished FineTuneJob's pass decides, from what its attempt's Job is doing."""
    policy, out, now = job.spec.run_policy, observed.outcome, observed.now
    if (blocker := observed.blocker) is not None:
        if blocker.permanent:
            _finish(status, conds, now, False, blocker.reason, blocker.message)
        else:
            conds.set(CT.CREATED, False, blocker.reason, blocker.message)
            if out.state is State.ABSENT:
                # Running says it too: it explains a Pending job (the Reason column, the
                # per-job series), and there are no pods to say anything else. A Job that
                # runs already (its Secret deleted since, say) keeps its Running as it is.
                conds.set(CT.RUNNING, False, blocker.reason, blocker.message)
        return _Step([])
    if out.state is State.ABSENT:
        left = deadline_left(policy, status.get("startTime"), now)
        if left is not None and left <= 0:
            _finish(status, conds, now, False, Reason.DEADLINE_EXCEEDED, _spent(policy))
            return _Step([])
        return _Step([Action("create", attempt=status["attempts"], deadline=left)])
    if out.deleting:
        # The old gang is going; its Job's DELETED event brings the next pass, unless a pod
        # outlives its grace period and holds the next attempt back, maybe for good.
        return _Step([], requeue_after=_held_back(conds, out, status["attempts"], now, stuck_after))
    if out.attempt < status["attempts"]:
        return _Step([Action("delete", attempt=out.attempt, uid=out.uid)])
    if out.state is State.SUCCEEDED:
        _apply_result(status, out, conds)
        _finish(status, conds, now, True, Reason.TRAINING_COMPLETED, "all ranks succeeded")
        return _Step([])
    if out.state is State.FAILED:
        out = departed_unseen(out, prev)
        _apply_result(status, out, conds)
        waiting = _hearing_out(conds, out, now, node_lost_wait)
        if waiting is not None:
            return _Step([], requeue_after=waiting)
        retry = _after_failure(status, prev, conds, policy, out, now)
        return _Step([retry], retried=True) if retry else _Step([])
    return _while_active(job, observed, status, prev, conds)


def _settle(
    job: FineTuneJob,
    observed: Observed,
    status: Obj,
    prev: Obj,
    conds: Conditions,
    terminal: bool,
    requeue_after: float | None,
) -> float | None:
    """Complete the status from the pass's conditions (the phase, the timings, the evaluation
    summary); the requeue, which a verdict of this pass replaces with its TTL."""
    out = observed.outcome
    if out.state is not State.ABSENT and out.attempt:
        _timings(status, prev, job, observed)
    status["conditions"] = conds.ordered()
    status["phase"] = str(phase_of(conds))
    if not terminal and status["phase"] in TERMINAL and out.state is not State.ABSENT:
        # Finished by this pass: its TTL runs once the verdict is written, from the next pass.
        requeue_after = _ttl_left(job.spec.run_policy, status, observed.now)
    if status.get("evaluation"):
        spec = job.spec.evaluation
        summary = evaluation_summary(status["evaluation"], spec.gates, spec.metrics)
        if summary:
            status["evaluationSummary"] = summary[:256]
    return requeue_after


def _record_resume(
    status: Obj, prev: Obj, conds: Conditions, attempts: int, observed: Observed
) -> tuple[float | None, str | None]:
    """`record_resume` of the resume rank 0 reported: scraped from its metrics or, for an
    attempt no scrape caught resuming (one that only pushed a kept result, say), in its result,
    which is read at the attempt's end: that one is no measure of a restart's seconds."""
    out, resumed, late = observed.outcome, observed.resumed_from_step, False
    if resumed is None and out.attempt == attempts:
        resumed = resume_in_result(out.result, status.get("checkpoints") or {}, attempts)
        late = resumed is not None
    seconds, rejoin = record_resume(
        status, prev, conds, attempts, resumed, observed.resumed_at, observed.now
    )
    return (None if late else seconds), rejoin


def _ttl_left(policy: RunPolicy, status: Obj, now: str) -> float | None:
    """Seconds until runPolicy.ttlSecondsAfterFinished is up for a finished job; None: no TTL.

    The operator runs the TTL itself rather than setting the Job's: the Job controller would
    delete a finished Job at its TTL even when no pass had read its outcome yet (the operator
    busy or restarting), and that job would then look as if its Job had never been made, and
    be made again."""
    ttl = policy.ttl_seconds_after_finished
    if ttl is None:
        return None
    since = seconds_between(status.get("completionTime"), now)
    return max(ttl - (since or 0.0), 0.0)


def _held_back(
    conds: Conditions, out: Outcome, attempts: int, now: str, stuck_after: float
) -> float | None:
    """A pod of the attempt being deleted still there `stuck_after` seconds after its grace
    period ended: Running is False with reason PodStuckTerminating, saying what holds it and
    what to do. Before that, the seconds until then (a second late), to look again: nothing the
    operator watches changes while a pod is stuck."""
    pod = out.lingering
    if pod is None:
        return None
    wait = stuck_after - _seconds(pod.until, now)
    if wait >= 0:
        return wait + 1
    where = f" on node {pod.node}" if pod.node else ""
    more = f" (and {pod.others} more of its pods)" if pod.others else ""
    said = f" (its status: {pod.said})" if pod.said else ""
    node = pod.node or "<node>"
    conds.set(
        CT.RUNNING,
        False,
        Reason.POD_STUCK_TERMINATING,
        f"pod {pod.pod}{where}{more} of attempt {out.attempt} is still terminating, although "
        f"its grace period ended at {pod.until}{said}; attempt {attempts} starts once it is "
        "gone. A pod stays so while its node does not answer (lost, shut down, or cut off from "
        f"the control plane): if the node is gone for good, delete it (kubectl delete node "
        f"{node}) or mark it out of service (kubectl taint nodes {node} "
        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute), and Kubernetes removes its "
        "pods. A finalizer in the pod's metadata.finalizers holds it too.",
    )
    return None


def _expiry(
    policy: RunPolicy, status: Obj, out: Outcome, now: str
) -> tuple[list[Action], float | None]:
    """A finished job's Job: deleted (its pods with it) once runPolicy's TTL is up, else looked
    at again then."""
    left = _ttl_left(policy, status, now)
    if left is None or out.state is State.ABSENT or out.deleting:
        return [], None
    if left > 0:
        return [], left
    return [Action("delete", attempt=out.attempt, uid=out.uid)], None


def _hearing_out(conds: Conditions, out: Outcome, now: str, wait: float) -> float | None:
    """A failed attempt whose ranks timed out waiting for a peer whose pod has not reported its
    end (`Outcome.unheard`) is not counted yet. The pod is either still stopping (a hung rank:
    the Job controller's SIGTERM ends it within seconds) or on a node that stopped answering,
    which the node lifecycle controller marks not ready only after its grace period (50 s by
    default), maybe after the ranks gave up: that is a disruption, which backoffLimit does not
    bound. So wait until `wait` seconds after the failure, and return the seconds left (the
    pod's stop, or its Ready condition turning False, brings a pass sooner). Nothing is lost by
    waiting: the next attempt could not start before that pod is gone anyway. None: decide now."""
    waited = seconds_between(out.failed_at, now)
    if not out.unheard or out.permanent or waited is None or waited >= wait:
        return None
    conds.set(
        CT.RUNNING,
        False,
        Reason.RESTARTING,
        f"attempt {out.attempt} failed ({out.message[:512]}); {out.unheard} has not reported "
        f"its end: waiting up to {wait:g} s after the failure for it to stop, or for its node "
        "to be marked not ready (then the restart is a disruption, which does not count against "
        "runPolicy.backoffLimit)",
    )
    return wait - waited


def _after_failure(
    status: Obj, prev: Obj, conds: Conditions, policy: RunPolicy, out: Outcome, now: str
) -> Action | None:
    """A failed attempt: the FineTuneJob fails (a permanent reason, the deadline spent, the
    backoff limit reached), or the next attempt is recorded and the deletion that starts it is
    returned."""
    attempts = status["attempts"]
    # Restarts a disruption caused: attempts minus these is what backoffLimit bounds.
    disruptions = int(prev.get("disruptions") or 0)
    left = deadline_left(policy, status.get("startTime"), now)
    if out.permanent:
        _finish(status, conds, now, False, out.reason, out.message)
        return None
    if left is not None and left <= 0:
        msg = f"{_spent(policy)}; last attempt: {out.message[:512]}"
        _finish(status, conds, now, False, Reason.DEADLINE_EXCEEDED, msg)
        return None
    if not out.disruption and attempts - disruptions > policy.backoff_limit:
        msg = f"{attempts - disruptions} attempt(s) failed"
        if disruptions:
            msg += f" (and {disruptions} disrupted, which do not count)"
        msg += f"; last: {out.message[:512]}"
        _finish(status, conds, now, False, Reason.BACKOFF_LIMIT_EXCEEDED, msg)
        return None
    # Record the next attempt (and a disruption) before deleting, so a crash in between still
    # restarts, and counts the same.
    restarted_at = (status.get("checkpoints") or {}).get("lastRestartTime")
    status["attempts"] = attempts + 1
    status["checkpoints"] = {**status.get("checkpoints", {}), "lastRestartTime": now}
    # An in-place restart already counted this disruption when its pod stopped no later than
    # that restart (both date a stop by `lifecycle._stopped_at`): the pod's peers stopping too
    # then ends the attempt, and that is still one disruption.
    counted = bool(out.disruption_at and restarted_at) and not later(
        out.disruption_at, restarted_at
    )
    if out.disruption and not counted:
        status["disruptions"] = disruptions + 1
        msg = (
            f"attempt {attempts} was disrupted ({out.disruption[:512]}); a disruption "
            f"does not count against runPolicy.backoffLimit; starting attempt {attempts + 1}"
        )
    elif out.disruption:
        msg = (
            f"attempt {attempts} ended after {out.disruption[:512]} (one disruption, counted "
            f"once; it does not count against runPolicy.backoffLimit); starting attempt "
            f"{attempts + 1}"
        )
    else:
        msg = f"attempt {attempts} failed ({out.message[:512]}); starting attempt {attempts + 1}"
    conds.set(CT.RUNNING, False, Reason.RESTARTING, msg)
    return Action("delete", attempt=out.attempt, uid=out.uid)


@dataclass(frozen=True)
class _Step:
    """What a pass decides: its actions, and when to look again (None: at the next event)."""

    actions: list[Action]
    # The message of an in-place restart this pass saw begin.
    began: str | None = None
    requeue_after: float | None = None
    # Whether this pass starts the next attempt after a failure.
    retried: bool = False

    @property
    def restarted(self) -> bool:
        """Whether this pass restarts the gang: as the next attempt, or in place (`began`)."""
        return self.retried or self.began is not None


def _while_active(
    job: FineTuneJob, observed: Observed, status: Obj, prev: Obj, conds: Conditions
) -> _Step:
    """An attempt whose Job exists and has not ended: its Job kept in line with the run policy
    (patched, suspended or resumed, its Kueue workload), a pending timeout, an in-place restart
    around a stopped pod, and why it does not run yet."""
    policy, now = job.spec.run_policy, observed.now
    hang_timeout = float(policy.hang_timeout_seconds)
    out = replaced_unseen(observed.outcome, observed.stamps, prev, hang_timeout, now)
    attempts = status["attempts"]
    actions: list[Action] = []
    conds.set(
        CT.CREATED,
        True,
        Reason.WORKLOAD_CREATED,
        f"Job {naming.batch_job_name(job.metadata.name)} attempt {out.attempt}",
    )
    if observed.progress and out.state is State.RUNNING:
        status["progress"] = observed.progress
    store, stop = observed.store, observed.stop_seconds
    if stop is not None and out.state is State.RUNNING and store is not None and store.durable:
        # Without a durable store a stop's checkpoint is lost with the pod whatever the time.
        conds.set(CT.SAVES_ON_STOP, *checkpoints.saves_on_stop(job, stop))
    waited = _pending_seconds(observed) if not policy.suspend else None
    timed_out = _pending_timeout(out.stuck, policy, waited)
    if timed_out or out.evicted:
        # Either ends the job, and its Job is deleted: a pod stuck for good would hold what it
        # got (a node, an accelerator) and train for a Failed FineTuneJob once the cause is
        # fixed; a pod evicted for its local storage would be replaced, to fill it again.
        reason = Reason.PENDING_TIMEOUT if timed_out else Reason.INVALID_SPEC
        _finish(status, conds, now, False, reason, timed_out or out.evicted)
        return _Step([Action("delete", attempt=out.attempt, uid=out.uid)])
    patch = job_patch(observed.job, policy, status.get("startTime")) if observed.job else {}
    if patch:
        actions.append(Action("patch", attempt=out.attempt, uid=out.uid, patch=patch))
    # Not looked up (no queue, or a unit test): as if Kueue had not made it yet.
    wl = observed.workload or Workload(Lookup.NOT_YET)
    if policy.queue_name and (active := workload_patch(conds, policy, wl)) is not None:
        actions.append(Action("activate", uid=wl.uid, name=wl.name, patch=active))
    if policy.suspend:
        suspend(conds, policy, out, wl)
        return _Step(actions)
    resume(conds, policy, out, wl)
    if out.state is State.RUNNING:
        status["startTime"] = status.get("startTime") or now
    # The Job controller waits 10 s before it replaces a failed pod, twice that for the next
    # one of the same Job, and so on: a second stop in one attempt restarts the whole gang as a
    # new attempt, whose Job has replaced nothing yet. So does a stop on a lost node, which the
    # Job would not replace, nor could the gang save with it (`Leaving.lost`).
    lost = out.leaving is not None and bool(out.leaving.lost)
    anew = attempts + 1 if lost or replaced_before(prev, observed.job) else None
    began = restart_in_place(status, prev, conds, out, now, anew)
    if began is not None and anew is not None:
        status["attempts"] = anew
        actions.append(Action("delete", attempt=out.attempt, uid=out.uid))
    if out.stuck is not None:
        # Rank 0 may run, but the gang cannot train without the stuck pod.
        conds.set(CT.RUNNING, False, out.stuck.reason, out.stuck.message)
    elif out.node_not_ready and conds.reason(CT.RUNNING) != Reason.RESTARTING:
        conds.set(CT.RUNNING, False, Reason.NODE_NOT_READY, node_not_ready(out.node_not_ready))
    elif out.state is State.PENDING and _stuck_reason(conds):
        conds.set(
            CT.RUNNING,
            False,
            Reason.PODS_PENDING,
            f"{out.unstarted} pod(s) not started yet; none is stuck",
        )
    return _Step(actions, began, _requeue_after(out, policy, waited))


def _pending_seconds(observed: Observed) -> int | None:
    """Seconds the stuck pod has waited: since it was made (a replacement pod), else since the
    attempt's Job started (`job_started`); None when it cannot be told."""
    stuck = observed.outcome.stuck
    started = (stuck.since if stuck else None) or (
        job_started(observed.job) if observed.job else None
    )
    return max(_seconds(started, observed.now), 0) if started else None


def _stuck_reason(conds: Conditions) -> bool:
    """Whether Running still says why pods could not start or be made (a stuck pod, or what
    held the Job back), which pods on their way replace."""
    return conds.reason(CT.RUNNING) in _SUPERSEDED_BY_PODS


def _requeue_after(out: Outcome, policy: RunPolicy, waited: int | None) -> float | None:
    """When to look again at an attempt whose pods have not all started: when a stuck one's
    time is up (a second late, so that it is); soon, while the Job controller has not made them
    all, to see a FailedCreate; else never: a made pod that gets stuck changes, and its watch
    event (`handlers.pod_changed`) brings the pass that sees it."""
    if out.state not in (State.PENDING, State.RUNNING):
        return None
    if out.stuck is not None and waited is not None:
        return float(policy.pending_timeout_seconds - waited + 1)
    if not out.unmade:
        return None
    least, most = PENDING_CHECK_SECONDS
    return min(max((waited or 0) / 10, least), most)


def _pending_timeout(stuck: Stuck | None, policy: RunPolicy, waited: int | None) -> str:
    """The Failed message when a stuck pod's runPolicy.pendingTimeoutSeconds is up, else ""."""
    if stuck is None or waited is None or waited < policy.pending_timeout_seconds:
        return ""
    hint = PENDING_HINTS.get(stuck.reason, "")
    return (
        f"{stuck.reason} for longer than runPolicy.pendingTimeoutSeconds "
        f"({policy.pending_timeout_seconds} s; {waited} s since the attempt's Job started): "
        f"{stuck.message}" + (f". To fix: {hint}" if hint else "")
    )


def _spent(policy: RunPolicy) -> str:
    return (
        f"runPolicy.activeDeadlineSeconds ({policy.active_deadline_seconds} s for the whole job, "
        "every attempt together) ran out"
    )


def invalid_status(prev: Obj, generation: int, now: str, message: str) -> Obj:
    """The status of a FineTuneJob the API server admitted but the models reject: Failed with
    InvalidSpec, nothing else planned (the CRD and the Python rules disagree; say so)."""
    conds = Conditions(prev.get("conditions") or [], now, generation)
    conds.set(CT.FAILED, True, Reason.INVALID_SPEC, message)
    return {
        "phase": str(Phase.FAILED),
        "observedGeneration": generation,
        "conditions": conds.ordered(),
    }


def derive_status(job: FineTuneJob, observed: Observed) -> dict[str, Any]:
    """The status the FineTuneJob should have after this pass."""
    return plan(job, observed).status
