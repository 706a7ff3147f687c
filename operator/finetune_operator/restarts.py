"""Gang restarts and resumes, as the status records them: status.checkpoints (where the gang
resumed from, when, what it lost), status.disruptions, and the Restarting condition of a pod
replaced in place or of a gang restarted as a new attempt around a lost one. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from finetune_api import phases
from finetune_api.constants import ConditionType, Reason
from finetune_api.result import TrainerResult
from finetune_operator import timings
from finetune_operator.conditions import Conditions, Obj, previous_condition
from finetune_operator.lifecycle import Leaving, LostNode, Outcome, State
from finetune_operator.timings import later, seconds_between

CT = ConditionType


# How much later than rank 0's gang formed a pod must be made to be a replacement
# (`replaced_unseen`): the stamp is rank 0's node's clock, a pod's creation the API server's;
# a gang forms seconds after its pods are made, and a replacement comes at least the pod garbage
# collector's 40 s quarantine after its node went.
FORMED_SKEW_SECONDS = 10.0


# What a replacement that no pass saw coming says of the pod it replaces (`replaced_unseen`).
GONE_UNSEEN = (
    "the pod it replaces went without the gang stopping with it (removed with its node by the "
    "pod garbage collector, or force-deleted)"
)


def record_resume(
    status: Obj,
    prev: Obj,
    conds: Conditions,
    attempt: int,
    resumed: int | None,
    at: str | None,
    now: str,
) -> tuple[float | None, str | None]:
    """status.checkpoints on each report of a new resume (the gang re-formed: a new attempt,
    around a replaced pod, or after a suspend): rank 0 resumed from step `resumed` at `at`. The
    steps lost since the last step read and, when a restart was under way, the seconds from its
    failure being seen to the gang training again. Returns those seconds, and the message of a
    restart that no pass saw begin (a pod replaced while no operator ran)."""
    ckpt = dict(status.get("checkpoints") or {})
    restart_seconds, unseen = None, None
    if resumed is not None and _new_resume(ckpt, attempt, resumed, at):
        last_step = int((prev.get("progress") or {}).get("step") or 0)
        ckpt["stepsLost"] = int(ckpt.get("stepsLost") or 0) + max(last_step - resumed, 0)
        if restarting(ckpt, attempt):
            restart_seconds = seconds_between(ckpt.get("lastRestartTime"), at or now)
        elif (
            at is not None and ckpt.get("attempt") == attempt and not _resumed_by_user(conds, ckpt)
        ):
            # The gang re-formed within the attempt, neither after a suspend nor after a stop
            # some pass saw: a pod was replaced while no operator ran. It is a disruption too.
            status["disruptions"] = int(prev.get("disruptions") or 0) + 1
            # When it began is not known; it ended then, and this attempt's Job has replaced
            # a pod (a second stop restarts the gang as a new attempt: status._while_active).
            ckpt["lastRestartTime"] = at
            unseen = (
                f"the gang re-formed around a replaced pod and resumed from step {resumed} "
                "(the pod was stopped while the operator was not running; a disruption does not "
                "count against runPolicy.backoffLimit)"
            )
        ckpt["resumedFromStep"], ckpt["attempt"] = resumed, attempt
        ckpt["lastResumeTime"] = at or now
    if ckpt:
        status["checkpoints"] = ckpt
    return restart_seconds, unseen


def resume_in_result(result: TrainerResult | None, ckpt: Obj, attempt: int) -> int | None:
    """The step rank 0's result says attempt `attempt` resumed from, where no scrape recorded
    that attempt's resume: an attempt too short for one, such as one that found a kept result
    and only pushed it (it reports the result's last step)."""
    if result is None or ckpt.get("attempt") == attempt:
        return None
    return result.resumed_from_step


def _resumed_by_user(conds: Conditions, ckpt: Obj) -> bool:
    """Whether runPolicy.suspend was lifted since the gang last resumed: its new pods resume."""
    suspended = conds.by_type.get(CT.SUSPENDED) or {}
    lifted = suspended.get("reason") == Reason.RESUMED
    return lifted and later(suspended.get("lastTransitionTime"), ckpt.get("lastResumeTime"))


def _new_resume(ckpt: Obj, attempt: int, resumed: int, at: str | None) -> bool:
    """Whether rank 0's report is a resume not yet recorded."""
    if ckpt.get("attempt") != attempt:
        return True
    if at is None:  # a trainer that does not say when: new pods resume from another step
        return resumed != ckpt.get("resumedFromStep")
    return later(at, ckpt.get("lastResumeTime"))


def restarting(ckpt: Obj, attempt: int) -> bool:
    """Whether a gang restart is under way as attempt `attempt` reports: its failure was seen
    after the gang last resumed, or the gang last resumed in an earlier attempt (whose end was
    recorded as this one was made). The attempt decides that case, not the times: they are whole
    seconds, and a failure seen in the second of the last resume is not later than it."""
    if ckpt.get("attempt") not in (None, attempt):
        return True
    return later(ckpt.get("lastRestartTime"), ckpt.get("lastResumeTime"))


def replaced_unseen(
    out: Outcome, stamps: Mapping[str, float], prev: Obj, hang_timeout: float, now: str
) -> Outcome:
    """The outcome, with a `Leaving` for a member of the running gang that left unseen. The Job
    makes a pod only for an index whose pod is gone, so a pod made after the rest of the gang
    replaces a member; when no pass saw that member go (nor recorded a restart since), it went
    at once: removed with its node by the pod garbage collector, whose Failed mark a pass can
    miss, or force-deleted. Its rank stopped before the gang could save, and the rest waits in
    its collectives, or, in a phase the trainer does not time (a load, a save, the push), for
    torch's 30-minute timeout. Rank 0's stamps (this pass's scrape of its running process) tell
    a replacement the gang cannot rejoin from one it re-formed with (`_member_replaced`,
    `_rank0_replaced`)."""
    if out.state is not State.RUNNING or out.leaving is not None:
        return out
    ckpt = prev.get("checkpoints") or {}
    made = _made_at(out)
    leaving = _member_replaced(out, made, stamps, ckpt) or _rank0_replaced(
        out, made, stamps, ckpt, hang_timeout, now
    )
    return replace(out, leaving=leaving) if leaving is not None else out


def departed_unseen(out: Outcome, prev: Obj) -> Outcome:
    """A failed attempt, as a disruption when a member of its gang left unseen before it
    failed: the replacement the Job made for it is there, made after rank 0's process formed
    the gang (the stamp its failure result carries), beside a pod the gang formed with, and no
    restart was recorded since (`_member_replaced`, as for a running gang). The operator was
    away while the pod garbage collector removed the member, and the ranks left waiting for it
    ended the attempt (CollectiveTimeout, or a collective that failed); the attempt's failure
    is the lost member's, not the spec's, and spends no backoffLimit. A gang that re-formed with
    the replacement (an in-place rejoin) has a later stamp, and its failure counts."""
    result = out.result
    if out.state is not State.FAILED or out.permanent or out.disruption:
        return out
    if result is None or result.rank is not None:  # not rank 0's account
        return out
    made = _made_at(out)
    left = _member_replaced(out, made, result.phases, prev.get("checkpoints") or {})
    if left is None:
        return out
    # The replacement may run on (it waits for a gang to form): it is what the failure was
    # waiting for, not a pod whose node may be lost (`Outcome.unheard`).
    disruption = f"{left.what}; {left.lost}"
    return replace(out, disruption=disruption, disruption_at=left.since or "", unheard="")


def _made_at(out: Outcome) -> dict[str, float]:
    """When each pod of `out` was made (Unix seconds), by name."""
    return {name: t for name, at in out.made.items() if (t := timings.unix(at)) is not None}


def _member_replaced(
    out: Outcome, made: Mapping[str, float], stamps: Mapping[str, float], ckpt: Obj
) -> Leaving | None:
    """A pod made after rank 0's running process formed its gang (its rendezvous stamp),
    beside a pod the gang formed with. Only that process's stamp dates the gang: after a stop
    the gang saved (an in-place rejoin no pass saw, the operator away), rank 0's process starts
    again and has no stamp until the gang re-forms, with the replacement. The last resume in
    status would date the old gang, and take that replacement for an unseen loss (a kind fault
    run did)."""
    formed = stamps.get(phases.RENDEZVOUS)
    if formed is None:
        return None
    formed_at = timings.rfc3339(formed)
    if later(ckpt.get("lastRestartTime"), formed_at):
        return None  # a restart since the gang formed: its replacement is expected
    members = [name for name, t in made.items() if t <= formed]
    late = sorted((t, name) for name, t in made.items() if t > formed + FORMED_SKEW_SECONDS)
    if not members or not late:
        return None
    name = late[0][1]
    what = f"pod {name} was made at {out.made[name]}, after the gang formed at {formed_at}"
    return Leaving(what, out.made[name], lost=GONE_UNSEEN)


def _rank0_replaced(
    out: Outcome,
    made: Mapping[str, float],
    stamps: Mapping[str, float],
    ckpt: Obj,
    hang_timeout: float,
    now: str,
) -> Leaving | None:
    """Rank 0's own pod made after the rest of the gang, its process waiting for a gang that
    has not formed (a process stamp, no rendezvous stamp) for longer than the hang timeout,
    while every pod of the gang runs. Members that saved with the old rank 0 rejoin its
    replacement within seconds; members left in the old gang's collectives never come."""
    started, mine = stamps.get(phases.PROCESS_STARTED), made.get(out.rank0_pod)
    others = [t for name, t in made.items() if name != out.rank0_pod]
    if started is None or phases.RENDEZVOUS in stamps or mine is None or not others:
        return None
    if out.unstarted:
        return None  # a member still starting: rank 0 waits for it, not for a lost gang
    if mine <= min(others) + FORMED_SKEW_SECONDS:
        return None  # made with the rest: the gang's first forming
    if later(ckpt.get("lastRestartTime"), timings.rfc3339(min(others))):
        return None  # a restart since the gang's pods were made: its replacement is expected
    waited = (timings.unix(now) or started) - started
    if waited <= hang_timeout + FORMED_SKEW_SECONDS:
        return None
    name = out.rank0_pod
    what = (
        f"pod {name} (rank 0) was made at {out.made[name]}, after the rest of the gang, and has "
        f"waited {waited:.0f} s for it to form"
    )
    return Leaving(what, out.made[name], lost=GONE_UNSEEN)


def node_not_ready(lost: LostNode) -> str:
    """Running's message while a running pod's node is not ready: what that may mean, and what
    happens next."""
    since = f" since {lost.since}" if lost.since else ""
    return (
        f"{lost.what}{since}: the control plane no longer hears from its kubelet, and its rank "
        "may be lost with it. If so, the other ranks end the attempt after "
        "runPolicy.hangTimeoutSeconds while they train or evaluate, or Kubernetes evicts the pod "
        "once its toleration of node.kubernetes.io/unreachable runs out (300 s unless the pod "
        "template sets one), and the gang restarts without the node (a disruption, not counted "
        "against runPolicy.backoffLimit); a one-node gang waits until the node answers "
        f"again, or is deleted (kubectl delete node {lost.node}) or marked out of service "
        f"(kubectl taint nodes {lost.node} node.kubernetes.io/out-of-service=nodeshutdown:"
        "NoExecute) and Kubernetes replaces its pod"
    )


def restart_in_place(
    status: Obj, prev: Obj, conds: Conditions, out: Outcome, now: str, anew: int | None
) -> str | None:
    """A pod of the running attempt was stopped (out.leaving): the Job controller replaces it and
    the rest of the gang rejoins it from the checkpoint the gang saved. The first pass to see it
    records the restart (a disruption: backoffLimit is not spent) and returns its message (with
    `anew`, the attempt the gang restarts as instead, whose Job the caller makes); until
    every pod runs again (the stopped one gone, its replacement running), Running is False with
    reason Restarting."""
    ckpt = status.setdefault("checkpoints", {})
    leaving, began = out.leaving, None
    old = previous_condition(prev, CT.RUNNING)
    under_way = old.get("status") == "False" and old.get("reason") == Reason.RESTARTING
    since = (leaving.since or now) if leaving is not None else None
    # A pod stopped after the last restart and resume: a Failed pod that the kubelet evicted
    # stays listed after its replacement joined, and is not a new restart. Nor is a pod that a
    # suspension stopped and that is still listed when the pass that resumes the Job looks
    # again: it stopped while the attempt was Suspended, or before that ended.
    paused = previous_condition(prev, CT.SUSPENDED)
    new = (
        later(since, ckpt.get("lastRestartTime"))
        and later(since, ckpt.get("lastResumeTime"))
        and paused.get("status") != "True"
        and later(since, paused.get("lastTransitionTime"))
    )
    if leaving is not None and new and not under_way:
        ckpt["lastRestartTime"] = since
        status["disruptions"] = int(prev.get("disruptions") or 0) + 1
        saved = "from the checkpoint the gang saved as it stopped"
        if anew is None:
            how = (
                f"the Job replaces that pod, and the rest of the gang rejoins it in place, {saved}"
            )
        elif leaving.lost:
            how = (
                f"{leaving.lost}: its rank stopped before the gang could save, so the others "
                f"cannot rejoin a replacement in place; the gang restarts as attempt {anew}, from "
                "its last checkpoint"
            )
        else:
            how = (
                "a pod of this attempt was replaced before, and the Job controller waits twice "
                f"as long for each further one, so the gang restarts as attempt {anew}, {saved}"
            )
        free = "a disruption does not count against runPolicy.backoffLimit"
        began = f"{leaving.what}: {how} ({free})"
        conds.set(CT.RUNNING, False, Reason.RESTARTING, began)
    elif under_way and (out.unstarted or (leaving is not None and leaving.terminating)):
        conds.set(CT.RUNNING, False, Reason.RESTARTING, old.get("message") or "")
    return began


def replaced_before(prev: Obj, job: Obj | None) -> bool:
    """Whether the attempt's Job replaced a stopped pod before: the last restart (before this
    one) began after the Job was made."""
    made = ((job or {}).get("metadata") or {}).get("creationTimestamp")
    last = (prev.get("checkpoints") or {}).get("lastRestartTime")
    return made is not None and later(last, made)


def with_restart(
    transitions: list[tuple[str, str, str]], rejoin: str | None
) -> list[tuple[str, str, str]]:
    """An in-place restart gets its Event even when a stuck replacement pod's reason took the
    Running condition in the same pass."""
    if rejoin is None or any(reason == Reason.RESTARTING for _, reason, _ in transitions):
        return transitions
    return [*transitions, (f"Not{CT.RUNNING}", Reason.RESTARTING, rejoin)]
