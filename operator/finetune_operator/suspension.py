"""runPolicy.suspend, of a Job the operator suspends itself or of one that Kueue queues: the
Suspended and Running conditions while the gang stops and comes back, and the patch of the Kueue
Workload's spec.active. Pure.
"""

from __future__ import annotations

from finetune_api.constants import ConditionType, Reason
from finetune_api.v1alpha1 import RunPolicy
from finetune_operator.conditions import Conditions, Obj
from finetune_operator.kueue import Lookup, Workload
from finetune_operator.lifecycle import Outcome, State

CT = ConditionType


def suspended_here(conds: Conditions) -> bool:
    """Whether runPolicy.suspend suspended this FineTuneJob (or is suspending it)."""
    old = conds.by_type.get(CT.SUSPENDED) or {}
    return old.get("status") == "True" or old.get("reason") == Reason.SUSPENDING


def workload_patch(conds: Conditions, policy: RunPolicy, wl: Workload) -> Obj | None:
    """Kueue's half of runPolicy.suspend: the patch of its Workload's spec.active, the field
    Kueue leaves to others (Job.spec.suspend is Kueue's), or None. Deactivated while suspend is
    true; reactivated only when it was this FineTuneJob's suspend that deactivated it: Kueue
    deactivates workloads itself too (e.g. past their requeuing limit), and that verdict
    stands."""
    if wl.lookup is not Lookup.FOUND or wl.refused:
        return None
    if policy.suspend and wl.active:
        return {"active": False}
    if not policy.suspend and not wl.active and suspended_here(conds):
        return {"active": True}
    return None


def suspend(conds: Conditions, policy: RunPolicy, out: Outcome, wl: Workload) -> None:
    """runPolicy.suspend is true. Suspended=True only once the Job is suspended and its pods are
    gone; until then Suspending, while the pods save their checkpoint (SIGTERM)."""
    why = "runPolicy.suspend is true"
    if out.state is State.SUSPENDED and out.live_pods == 0:
        if not policy.queue_name:
            message = f"{why}: the Job is suspended and its pods are gone"
        elif wl.deactivated:
            message = (
                f"{why}: Kueue Workload {wl.name} is deactivated (spec.active=false), the Job "
                "is suspended and its pods are gone"
            )
        else:
            message = f"{why}: the Job is suspended and has no pods; {wl.where()}"
            if wl.lookup is Lookup.NOT_YET:
                message += " (it is deactivated as soon as it appears)"
        conds.set(CT.SUSPENDED, True, Reason.SUSPENDED, message)
        conds.set(CT.RUNNING, False, Reason.SUSPENDED, "suspended")
        return
    if out.state is State.SUSPENDED:
        message = (
            f"{why}: the Job is suspended and {out.live_pods} pod(s) are stopping: each got "
            "SIGTERM and saves a checkpoint before it exits (reason Interrupted)"
        )
    elif not policy.queue_name:
        message = f"{why}: suspending the Job; its pods get SIGTERM and save a checkpoint"
    elif wl.lookup is Lookup.FOUND and wl.refused:
        message = f"{why}, but Kueue Workload {wl.name} refused spec.active=false: {wl.refused}"
    elif wl.lookup is Lookup.FOUND:
        message = (
            f"{why}: Kueue Workload {wl.name} is deactivated (spec.active=false); waiting for "
            "Kueue to evict it and suspend the Job"
        )
    else:
        message = f"{why}, but the Job runs and only Kueue may suspend it: {wl.where()}"
    conds.set(CT.SUSPENDED, False, Reason.SUSPENDING, message)
    running = out.running_pods
    detail = f"{running} pod(s) running until they have saved a checkpoint" if running else why
    conds.set(CT.RUNNING, running > 0, Reason.SUSPENDING, detail)


def _queue_detail(out: Outcome, wl: Workload) -> str:
    """What keeps a suspended, queued Job waiting, as Kueue reports it."""
    parts = []
    if out.live_pods:
        parts.append(f"{out.live_pods} pod(s) stopping (SIGTERM: saving a checkpoint)")
    if wl.lookup is not Lookup.FOUND:
        parts.append(wl.where())
    else:
        if wl.evicted:
            parts.append(f"evicted by Kueue ({wl.evicted[0]}): {wl.evicted[1][:512]}")
        if wl.quota_reserved and not wl.admitted:
            parts.append(f"quota reserved in ClusterQueue {wl.cluster_queue}; not admitted yet")
        elif wl.pending:
            parts.append(wl.pending)
    return "; ".join(parts)


def resume(conds: Conditions, policy: RunPolicy, out: Outcome, wl: Workload) -> None:
    """runPolicy.suspend is false: Resumed after a suspend, then what runs or waits."""
    queue = policy.queue_name
    here = suspended_here(conds)
    # A Workload this FineTuneJob deactivated is reactivated in this pass (workload_patch).
    deactivated = wl.deactivated and not here
    if here and queue and wl.refused and wl.deactivated:
        # Not resumed: the condition stays as it was, so that the next pass tries again.
        old = conds.by_type[CT.SUSPENDED]
        message = (
            f"runPolicy.suspend is false, but Kueue Workload {wl.name} refused "
            f"spec.active=true: {wl.refused}"
        )
        conds.set(CT.SUSPENDED, old["status"] == "True", old["reason"], message)
    elif here:
        if not queue:
            message = "runPolicy.suspend is false: the Job is resumed"
        elif wl.lookup is Lookup.FOUND:
            message = (
                f"runPolicy.suspend is false: Kueue Workload {wl.name} is active again and "
                f"queues in {queue} for admission"
            )
        else:
            message = f"runPolicy.suspend is false; {wl.where()}"
        message += "; the trainer resumes from its last checkpoint"
        conds.set(CT.SUSPENDED, False, Reason.RESUMED, message)
    running_reason = conds.reason(CT.RUNNING)
    if out.state is State.RUNNING:
        conds.set(CT.RUNNING, True, Reason.PODS_RUNNING, f"{out.running_pods} pod(s) running")
    elif queue and out.state is State.SUSPENDED and deactivated:
        evicted = f" ({wl.evicted[0]}: {wl.evicted[1][:512]})" if wl.evicted else ""
        message = (
            f"Kueue Workload {wl.name} is deactivated (spec.active=false){evicted}, so Kueue "
            "does not admit it: activate it, or suspend and resume this FineTuneJob"
        )
        conds.set(CT.RUNNING, False, Reason.DEACTIVATED, message)
    elif queue and out.state is State.SUSPENDED:
        detail = _queue_detail(out, wl)
        message = f"waiting for Kueue queue {queue}" + (f": {detail}" if detail else "")
        conds.set(CT.RUNNING, False, Reason.QUEUED, message)
    elif queue and out.state is State.PENDING and wl.admitted:
        message = f"admitted by Kueue (ClusterQueue {wl.cluster_queue}); waiting for the pods"
        conds.set(CT.RUNNING, False, Reason.ADMITTED, message)
    elif out.state is State.PENDING and running_reason in (Reason.SUSPENDED, Reason.SUSPENDING):
        conds.set(CT.RUNNING, False, Reason.RESUMED, "resumed; waiting for the pods")
