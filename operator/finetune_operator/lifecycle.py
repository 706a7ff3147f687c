"""Classify what the cluster shows for one attempt. Pure.

`observe_job` turns a batch Job and its pods into an `Outcome`: its state and, once it ended,
the verdict. The verdict comes from the trainer's typed result (rank 0's termination message);
exit codes only drove the Job's podFailurePolicy. `finetune_operator.status.plan` decides what
to do about it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from finetune_api.constants import Reason
from finetune_api.pod import CONTAINER_NAME, REPLACED_EXIT_CODES
from finetune_api.result import TrainerResult, scrub
from finetune_operator import naming, timings

Obj = dict[str, Any]
# The Nodes the reconciler read (`nodes_to_read`), by name: None for one that does not exist. A
# node it could not read is left out: nothing is known of it.
Nodes = Mapping[str, Obj | None]
# The Job controller's reason for a Job that a podFailurePolicy FailJob rule ended; ours has
# such rules for the permanent exit codes only.
POD_FAILURE_POLICY = "PodFailurePolicy"
# The Job controller's reason for a Job that ran past its activeDeadlineSeconds.
JOB_DEADLINE_EXCEEDED = "DeadlineExceeded"
# The Job controller's reason once a pod failed: an attempt's Job allows no pod retries (the gang
# restarts as a whole), so it says only that a pod failed, which the message says better. Left
# out of messages, where it reads as the FineTuneJob's own backoffLimit running out.
JOB_BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
# The pod condition that eviction, preemption, a node drain or the taint manager set before they
# delete a pod. The Job's podFailurePolicy ignores such a pod (and replaces it), so the attempt
# ends only when the rest of the gang stops; the gang restart is then the disruption's doing.
DISRUPTION_TARGET = "DisruptionTarget"
# The pod garbage collector's DisruptionTarget reason: it marks Failed and removes at once the
# pods of a node that was deleted or marked out of service, their ranks gone with the node.
DELETION_BY_POD_GC = "DeletionByPodGC"
# The Job controller's Event for each pod it makes: "Created pod: <name>". It outlasts the pod
# (Events live an hour by default), so it dates a replacement the Job made and then deleted as
# the Job failed, before a pass saw it.
SUCCESSFUL_CREATE = "SuccessfulCreate"
_CREATED_POD = re.compile(r"^Created pod: (\S+)$")
# A pod's status.reason once its kubelet evicted it; for its local storage, status.message is
# one of the kubelet's (pkg/kubelet/eviction/helpers.go): an emptyDir past its sizeLimit, or the
# pod or a container past its ephemeral-storage limit.
KUBELET_EVICTED = "Evicted"
EMPTY_DIR_OVER_LIMIT = re.compile(r'Usage of EmptyDir volume "([^"]+)" exceeds the limit')
EPHEMERAL_OVER_LIMIT = re.compile(
    r"Pod ephemeral local storage usage exceeds the total limit of containers"
    r"|Container \S+ exceeded its local ephemeral storage limit"
)
# Container waiting reasons of a pod that will not start until someone fixes something (the
# image, a Secret or ConfigMap it references, the container config). ErrImagePull and
# ImagePullBackOff alternate while the kubelet retries: both read as ImagePullBackOff, so the
# condition does not flap (nor post an Event) with every retry.
STUCK_WAITING_REASONS = {
    Reason.IMAGE_PULL_BACK_OFF: Reason.IMAGE_PULL_BACK_OFF,
    Reason.ERR_IMAGE_PULL: Reason.IMAGE_PULL_BACK_OFF,
    Reason.ERR_IMAGE_NEVER_PULL: Reason.ERR_IMAGE_NEVER_PULL,
    Reason.INVALID_IMAGE_NAME: Reason.INVALID_IMAGE_NAME,
    Reason.CREATE_CONTAINER_CONFIG_ERROR: Reason.CREATE_CONTAINER_CONFIG_ERROR,
    Reason.CREATE_CONTAINER_ERROR: Reason.CREATE_CONTAINER_ERROR,
}
# Every reason `Outcome.stuck` can carry.
STUCK_REASONS = frozenset(
    {*STUCK_WAITING_REASONS.values(), Reason.UNSCHEDULABLE, Reason.FAILED_CREATE}
)
# What a stuck message quotes from the kubelet, scheduler or Job controller at most.
STUCK_MESSAGE_CHARS = 512


class State(StrEnum):
    ABSENT = "Absent"
    SUSPENDED = "Suspended"
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Stuck:
    """A pod of the attempt (or the attempt's pods as a whole) that cannot start."""

    reason: Reason
    # `pod <name>: <what Kubernetes says>`, or `Job <name>: ...` when no pod could be made.
    message: str
    # When the stuck pod was made (RFC 3339): a replacement pod waits from then, not from the
    # Job's start. None: since the Job started.
    since: str | None = None


@dataclass(frozen=True)
class Leaving:
    """A pod of a running attempt that was stopped (it got SIGTERM: deleted, evicted,
    preempted) while the Job goes on: the Job controller replaces it, and the rest of the gang
    rejoins the new pod in place, from the checkpoint the gang saved as it stopped."""

    # `pod <name> got SIGTERM`, or `pod <name> was disrupted (<reason>: <message>)`.
    what: str
    # When it was stopped (RFC 3339): the deletion's start, the disruption's, or the exit.
    since: str | None
    # Whether one of them is still running (saving its checkpoint, or about to exit).
    terminating: bool = False
    # Set when the node of one of them is lost (`_lost`; Kubernetes evicts the pods of a node
    # that stays unreachable, by default 300 s after it is marked) or gone (the pod garbage
    # collector removed the pod): what happened to the node. Its rank went with the node before
    # the gang could save, so the others have nothing to rejoin in place (and the Job does not
    # replace a pod until its kubelet confirms the stop); the gang restarts instead.
    lost: str = ""


@dataclass(frozen=True)
class Lingering:
    """A pod of an attempt whose Job is being deleted that is still there. Its grace period ends
    (or ended) at `until`; a pod that long outlives it is held by a node that no longer answers
    (lost, shut down, cut off from the control plane), whose kubelet never confirms the stop, or
    by a finalizer. The Job's foreground deletion, and so the next attempt, waits for it."""

    pod: str
    # spec.nodeName; "" for a pod never scheduled.
    node: str
    # Its deletionTimestamp (RFC 3339): when its grace period ends.
    until: str
    # Further pods of the attempt in the same state.
    others: int = 0
    # What the pod's status says of it, `<reason>: <message>` (the node lifecycle controller's
    # `NodeLost: Node <node> which was running pod <pod> is unresponsive`); "" for nothing.
    said: str = ""


@dataclass(frozen=True)
class LostNode:
    """A pod that has not reported its end, on a node that is not ready or was deleted."""

    node: str
    # `node <node> of pod <pod> is not ready (Ready=<status>, <reason>: <message>)`, or
    # `node <node> of pod <pod> was deleted`.
    what: str
    # When the node was marked (its Ready condition's transition; RFC 3339, "" if not known).
    since: str = ""


@dataclass(frozen=True)
class Outcome:
    """One attempt as the cluster shows it."""

    state: State
    attempt: int = 0
    uid: str | None = None
    # Set for FAILED: whether a new attempt could help, and why not.
    permanent: bool = False
    reason: str = ""
    message: str = ""
    result: TrainerResult | None = None
    running_pods: int = 0
    # Pods of the attempt not yet Succeeded or Failed, terminating ones included: for a
    # suspended Job, the pods that got SIGTERM and are still saving their checkpoint.
    live_pods: int = 0
    rank0_ip: str | None = None
    # Set for RUNNING: the name of rank 0's running pod.
    rank0_pod: str = ""
    deleting: bool = False
    # Set for a retryable FAILED attempt that a disruption ended: what happened, for messages,
    # and when (RFC 3339; "" if not known), to tell whether an in-place restart counted it.
    disruption: str = ""
    disruption_at: str = ""
    # Set for a FAILED attempt: when its Job failed (RFC 3339; "" if not known).
    failed_at: str = ""
    # Set for a retryable FAILED attempt whose ranks timed out waiting for a peer
    # (CollectiveTimeout) while a pod of the gang, on a node not known to be lost, has not
    # reported its end: `pod <name> on node <node>`. Its node may be lost and not marked yet.
    unheard: str = ""
    # Set for PENDING and RUNNING: a pod that cannot start, and how many pods have not started.
    stuck: Stuck | None = None
    unstarted: int = 0
    # Set for PENDING and RUNNING: pods the Job controller has not made (yet). Why not is only
    # in its FailedCreate Events, which nothing watches.
    unmade: int = 0
    # Set for PENDING and RUNNING: a pod that was stopped and is being replaced.
    leaving: Leaving | None = None
    # Set for PENDING and RUNNING: the Failed message when the kubelet evicted a pod of the
    # attempt for its local storage (`_storage_eviction`). The trainer's SIGTERM save makes it
    # look like any stopped pod, which the Job replaces; the replacement would fill the same
    # volume again.
    evicted: str = ""
    # Set for RUNNING: a running pod whose node is not ready (`_lost`).
    node_not_ready: LostNode | None = None
    # When the last pod of the gang was scheduled, started and ended (timings.pod_times).
    pod_times: dict[str, float] = field(default_factory=dict)
    # Set with `deleting`: the pod whose grace period ended first, of those still there.
    lingering: Lingering | None = None
    # When pods were made (RFC 3339), by name: for PENDING and RUNNING each pod that is neither
    # ended nor going, for FAILED every pod. A pod made after the gang formed replaces a member
    # that left unseen (`restarts.replaced_unseen`, `restarts.departed_unseen`).
    made: dict[str, str] = field(default_factory=dict)


def true_conditions(obj: Obj) -> dict[str, Obj]:
    """The conditions of any object's status that are True, by type."""
    conds = (obj.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conds if c.get("status") == "True"}


def _index(pod: Obj) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(naming.COMPLETION_INDEX) or (
        meta.get("labels") or {}
    ).get(naming.COMPLETION_INDEX, "-1")
    try:
        return int(raw)
    except ValueError:
        return -1


def _terminated(pod: Obj) -> Obj | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            return (cs.get("state") or {}).get("terminated")
    return None


def _name(pod: Obj) -> str:
    return (pod.get("metadata") or {}).get("name") or f"index {_index(pod)}"


def _condition(pod: Obj, type_: str) -> Obj | None:
    conds = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == type_), None)


def _quote(text: str) -> str:
    """What Kubernetes said, fit for a condition: one line, bounded, token-scrubbed (an image
    pull error may quote a registry's reply)."""
    return scrub(" ".join(text.split()), {})[:STUCK_MESSAGE_CHARS]


def _trainer_result(pods: list[Obj]) -> TrainerResult | None:
    """The result that decides the attempt. A permanent failure of any rank comes first (rank 1
    may find a bad data shard while rank 0 only sees its peer vanish); else rank 0's, which
    alone writes the whole account (other ranks report only their rank, or repeat a failed
    verdict of rank 0's); else any readable one.
    """
    results = [
        r
        for pod in sorted(pods, key=_index)
        if (term := _terminated(pod)) and (r := TrainerResult.parse(term.get("message")))
    ]
    rank0 = next((r for r in results if r.rank is None), None)
    if rank0 is not None and rank0.reason == Reason.INTERRUPTED:
        # Rank 0 only stopped on SIGTERM, which the Job controller also sends the rest of a gang
        # once a pod failed: another rank's own failure says more.
        rank0 = next((r for r in results if not r.succeeded and r.reason != rank0.reason), rank0)
    for chosen in (
        next((r for r in results if not r.succeeded and r.permanent), None),
        rank0,
    ):
        if chosen is not None:
            return chosen
    return results[0] if results else None


def _crash_message(pods: list[Obj]) -> str:
    """For a pod that died without a result: its exit code and, with FallbackToLogsOnError, the
    tail of its log that the kubelet kept."""
    for pod in sorted(pods, key=_index):
        term = _terminated(pod)
        if term and term.get("exitCode"):
            tail = (term.get("message") or "").strip()[-256:]
            return f"exit code {term['exitCode']}" + (f": {tail}" if tail else "")
    return ""


def _oom_kill(pods: list[Obj]) -> tuple[bool, str] | None:
    """(permanent, message) when the kernel killed a trainer container for memory, else None.

    With a memory limit the container hit its own ceiling: the same spec on the same data peaks
    the same way, so another attempt would only be killed again; permanent. Without one, the
    node as a whole ran out (its OOM killer picked this container, perhaps for a neighbour's
    growth), which another attempt, maybe on another node, can survive; retryable.
    """
    for pod in sorted(pods, key=_index):
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        cs = next((c for c in statuses if c.get("name") == CONTAINER_NAME), {})
        terminated = [(cs.get(k) or {}).get("terminated") or {} for k in ("state", "lastState")]
        if not any(t.get("reason") == Reason.OOM_KILLED for t in terminated):
            continue
        containers = (pod.get("spec") or {}).get("containers") or []
        spec = next((c for c in containers if c.get("name") == CONTAINER_NAME), {})
        limit = ((spec.get("resources") or {}).get("limits") or {}).get("memory")
        name = (pod.get("metadata") or {}).get("name") or f"index {_index(pod)}"
        hint = "lower spec.training.batchSizePerDevice or spec.training.maxSeqLength"
        if limit:
            return True, (
                f"the trainer container of pod {name} was OOM-killed at its memory limit of "
                f"{limit}: raise spec.resources.limits.memory, or {hint}"
            )
        return False, (
            f"the trainer container of pod {name} was OOM-killed with no memory limit (the node "
            f"ran out of memory): set spec.resources.requests.memory and limits.memory to what "
            f"it needs, or {hint}"
        )
    return None


def _storage_eviction(pods: list[Obj]) -> str | None:
    """The Failed message when the kubelet evicted a trainer pod for its local storage, else
    None. Such an eviction sets no DisruptionTarget (the kubelet's local-storage checks pass no
    condition), so the pod just fails; and the same spec on the same data fills the same volume
    again, so it is permanent, naming the field that sizes what filled up."""
    for pod in sorted(pods, key=_index):
        status = pod.get("status") or {}
        said = " ".join((status.get("message") or "").split())
        if status.get("reason") != KUBELET_EVICTED or not said:
            continue
        evicted = f"the kubelet evicted pod {_name(pod)}: {said}"
        volume = EMPTY_DIR_OVER_LIMIT.search(said)
        if volume is not None and volume.group(1) == naming.CACHE_VOLUME:
            return (
                f"spec.template.cacheSize: {evicted} That volume (/tmp) holds the Hugging Face "
                "cache (the base model and dataset, unless the checkpoints are on a claim) and "
                "the artifact before its push: make template.cacheSize larger than they are "
                "(with output.hub.merge, the merged weights too)"
            )
        if volume is None and EPHEMERAL_OVER_LIMIT.search(said):
            return (
                f"spec.resources.limits: {evicted} Raise the ephemeral-storage limit (the /tmp "
                "volume alone may take template.cacheSize), or leave it out"
            )
    return None


def _disruption(pods: list[Obj], lost: list[LostNode]) -> tuple[str, str]:
    """What disrupted the attempt and when, or ("", "") when it failed for its own reasons.

    A pod with DisruptionTarget=True, a trainer that reported Interrupted (it got SIGTERM, and
    the gang saved a checkpoint and stopped), or a pod lost with its node (`_lost`) is a
    disruption. But a crash also ends the attempt's Job, whose controller then stops the other
    pods with SIGTERM: so the first pod to stop decides, and a failure of another kind at the
    same time or earlier (or at a time not known) wins. The trainer reports Interrupted only
    after the whole gang agreed to stop, which a gang with a dead rank cannot, so that race is
    rare; but it must not turn a crash that recurs every attempt into endless free restarts.
    Ranks that timed out waiting for a lost pod (CollectiveTimeout) only saw it go: they do not
    count as failures of their own, whenever they gave up.
    """
    disrupted = [(node.since, node.what) for node in lost]
    peer_lost = bool(lost)
    other: list[str] = []
    for pod in sorted(pods, key=_index):
        term = _terminated(pod) or {}
        result = TrainerResult.parse(term.get("message")) if term else None
        target = _condition(pod, DISRUPTION_TARGET)
        if target is not None and target.get("status") == "True":
            cause = ": ".join(x for x in (target.get("reason"), target.get("message")) if x)
            what = f"pod {_name(pod)} was disrupted" + (f" ({_quote(cause)})" if cause else "")
            disrupted.append((_stopped_at(pod), what))
        elif result is not None and result.reason == Reason.INTERRUPTED:
            what = f"pod {_name(pod)} got SIGTERM and the gang stopped"
            detail = f"{what}: {result.message}" if result.message else what
            disrupted.append((_stopped_at(pod), detail))
        elif peer_lost and result is not None and result.reason == Reason.COLLECTIVE_TIMEOUT:
            continue
        elif term.get("exitCode") or (result is not None and not result.succeeded):
            other.append(term.get("finishedAt") or "")
    if not disrupted:
        return "", ""
    first, what = min(disrupted)
    # "" (no time) sorts first: a failure of unknown time counts as the earlier one, and any
    # failure counts as earlier than a disruption of unknown time (a deleted node's).
    earlier = any(t <= first for t in other) or (not first and bool(other))
    return ("", "") if earlier else (what, first)


def _unheard(pods: list[Obj]) -> list[Obj]:
    """The pods on a node that have not reported their end: no terminated trainer container, and
    not Succeeded or Failed. Once its Job failed, a pod so is still stopping, or is on a node
    that no longer answers."""
    return [
        pod
        for pod in sorted(pods, key=_index)
        if (pod.get("spec") or {}).get("nodeName")
        and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and not _terminated(pod)
    ]


def nodes_to_read(job: Obj | None, pods: list[Obj]) -> set[str]:
    """The nodes whose state the attempt's verdict or its Running condition needs: once the Job
    failed, those of its pods that have not reported their end (`_unheard`); while it runs,
    those of its running pods marked not ready (the node lifecycle controller marks a node's
    pods so when the node stops answering). A healthy pass reads no Node."""
    if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
        return set()
    silent = _unheard(pods)
    if not {"Failed", "FailureTarget"} & set(true_conditions(job)):
        silent = [p for p in silent if (_condition(p, "Ready") or {}).get("status") == "False"]
    return {pod["spec"]["nodeName"] for pod in silent}


def _lost(pods: list[Obj], nodes: Nodes) -> list[LostNode]:
    """Each pod that has not reported its end on a node that is gone, or whose Ready condition
    is not True: the node lifecycle controller marks a node Unknown once its kubelet has been
    silent for its grace period (kube-controller-manager's --node-monitor-grace-period, 50 s by
    default), and a kubelet that cannot run pods reports False. Such a pod stopped with its
    node, as far as anyone can tell."""
    found: list[LostNode] = []
    for pod in _unheard(pods):
        name = pod["spec"]["nodeName"]
        if name not in nodes:
            continue  # not read: nothing known
        node = nodes[name]
        if node is None:
            found.append(LostNode(name, f"node {name} of pod {_name(pod)} was deleted"))
            continue
        ready = _condition(node, "Ready") or {}
        if ready.get("status") == "True":
            continue
        said = ": ".join(x for x in (ready.get("reason"), ready.get("message")) if x)
        state = f"Ready={ready.get('status') or 'unknown'}" + (f", {said}" if said else "")
        what = f"node {name} of pod {_name(pod)} is not ready ({_quote(state)})"
        found.append(LostNode(name, what, ready.get("lastTransitionTime") or ""))
    return found


def _stuck(pods: list[Obj]) -> Stuck | None:
    """The first pod (by index) that waits for something only a person can fix."""
    for pod in sorted(pods, key=_index):
        status = pod.get("status") or {}
        # Only a Pending pod: a running one that the scheduler still reports Unschedulable (no
        # kubelet ever bound it, as in tests) is not stuck, nor is one on its way out.
        going = (pod.get("metadata") or {}).get("deletionTimestamp")
        if status.get("phase") not in (None, "Pending") or going:
            continue
        statuses = (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        )
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = STUCK_WAITING_REASONS.get(waiting.get("reason", ""))
            if reason is not None:
                said = waiting.get("message") or waiting.get("reason")
                return Stuck(reason, f"pod {_name(pod)}: {_quote(said)}", _created(pod))
        scheduled = _condition(pod, "PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("reason") == Reason.UNSCHEDULABLE:
            said = scheduled.get("message") or "no node fits the pod"
            return Stuck(Reason.UNSCHEDULABLE, f"pod {_name(pod)}: {_quote(said)}", _created(pod))
    return None


def _created(pod: Obj) -> str | None:
    return (pod.get("metadata") or {}).get("creationTimestamp")


def _replaced_by_the_job(pod: Obj) -> bool:
    """Whether the Job's podFailurePolicy ignores this pod's end and replaces the pod (the
    render's Ignore rules): DisruptionTarget, or an exit code in REPLACED_EXIT_CODES."""
    target = _condition(pod, DISRUPTION_TARGET) or {}
    code = (_terminated(pod) or {}).get("exitCode")
    return target.get("status") == "True" or code in REPLACED_EXIT_CODES


def _leaving(pods: list[Obj], lost: list[LostNode]) -> Leaving | None:
    """The pods of a running attempt that were stopped and are being replaced (terminating, or
    ended by a disruption or with an exit code the Job ignores): the first one by index, when
    the last of them stopped, and whether one of them was on a lost node."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if any(not _replaced_by_the_job(pod) for pod in failed):
        # A pod failed in a way the Job counts, and the attempt's Job allows none (backoffLimit
        # 0): its controller deletes the other pods and only then shows FailureTarget. Until it
        # does, a pod it is deleting (a peer's replacement, say) is the gang stopping, not a
        # pod being replaced, and a pass that took it for one counted a second disruption.
        return None
    found: list[Leaving] = []
    lost_nodes = {node.node: node.what for node in lost}
    gone = ""
    for pod in sorted(pods, key=_index):
        meta, term = pod.get("metadata") or {}, _terminated(pod) or {}
        target = _condition(pod, DISRUPTION_TARGET) or {}
        terminating = bool(meta.get("deletionTimestamp")) and not term
        if not (terminating or _replaced_by_the_job(pod)):
            continue
        node = (pod.get("spec") or {}).get("nodeName") or ""
        if target.get("reason") == DELETION_BY_POD_GC:
            gone = gone or f"node {node} of pod {_name(pod)} is gone"
        gone = gone or lost_nodes.get(node, "")
        if target.get("status") == "True":
            cause = ": ".join(x for x in (target.get("reason"), target.get("message")) if x)
            what = f"pod {_name(pod)} was disrupted" + (f" ({_quote(cause)})" if cause else "")
        else:
            what = f"pod {_name(pod)} got SIGTERM"
        found.append(Leaving(what, _stopped_at(pod) or None, terminating))
    if not found:
        return None
    times = [f.since for f in found if f.since]
    busy = any(f.terminating for f in found)
    return Leaving(found[0].what, max(times) if times else None, busy, gone)


def _stopped_at(pod: Obj) -> str:
    """When a pod was stopped (RFC 3339; "" if not known): its disruption (DisruptionTarget's
    transition), else the start of its deletion, else its exit. One rule for the in-place
    restart (`Leaving.since`, recorded as lastRestartTime) and for the attempt a disruption
    ended (`Outcome.disruption_at`), so that one stop is not counted by both."""
    target = _condition(pod, DISRUPTION_TARGET) or {}
    disrupted_at = target.get("lastTransitionTime") if target.get("status") == "True" else None
    finished = (_terminated(pod) or {}).get("finishedAt")
    return disrupted_at or _deletion_start(pod.get("metadata") or {}) or finished or ""


def _deletion_start(meta: Obj) -> str | None:
    """When a pod's deletion was asked for: its deletionTimestamp is that plus the grace."""
    at, grace = meta.get("deletionTimestamp"), meta.get("deletionGracePeriodSeconds")
    if not at or grace is None:
        return None
    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00")) - timedelta(seconds=int(grace))
    except (ValueError, TypeError):
        return None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _lingering(pods: list[Obj]) -> Lingering | None:
    """The pod marked for deletion whose grace period ends first (then by index), and how many
    more are marked."""
    going = [p for p in pods if (p.get("metadata") or {}).get("deletionTimestamp")]
    if not going:
        return None
    first = min(going, key=lambda p: (p["metadata"]["deletionTimestamp"], _index(p)))
    node = str((first.get("spec") or {}).get("nodeName") or "")
    status = first.get("status") or {}
    said = ": ".join(str(x) for x in (status.get("reason"), status.get("message")) if x)
    until = first["metadata"]["deletionTimestamp"]
    return Lingering(_name(first), node, until, len(going) - 1, _quote(said))


def _parallelism(job: Obj) -> int:
    spec = job.get("spec") or {}
    return int(spec.get("parallelism") or spec.get("completions") or 1)


def needs_events(job: Obj | None, pods: list[Obj]) -> bool:
    """Whether the Job's Events could say why it has fewer pods than it runs: its status never
    says that its pods cannot be created (a missing ServiceAccount, a quota); only the Job
    controller's FailedCreate Events do. Asked only then, so a healthy pass reads no Events."""
    if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if (job.get("spec") or {}).get("suspend") or true_conditions(job):
        return False  # suspended, or finished (or about to be): no pods are due
    return len(pods) < _parallelism(job)


def needs_created_events(job: Obj | None, finished: bool) -> bool:
    """Whether the pods the Job made are worth reading from its Events: its attempt failed and
    the FineTuneJob has not `finished`. A pod the Job made and deleted again while no pass
    looked may have been a replacement for a member that left unseen (`_made_by_events`)."""
    if job is None or finished or (job.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return bool({"Failed", "FailureTarget"} & set(true_conditions(job)))


def _job_events(job: Obj, events: list[Obj], reason: str) -> list[Obj]:
    """The Events with `reason` about this Job (this uid: not a predecessor of its name)."""
    uid = (job.get("metadata") or {}).get("uid")
    return [
        e
        for e in events
        if e.get("reason") == reason and (e.get("involvedObject") or {}).get("uid") == uid
    ]


def _made_by_events(job: Obj, events: list[Obj]) -> dict[str, str]:
    """When the Job controller made each pod, by name, from its SuccessfulCreate Events."""
    made: dict[str, str] = {}
    for event in _job_events(job, events, SUCCESSFUL_CREATE):
        match = _CREATED_POD.match(event.get("message") or "")
        at = event.get("firstTimestamp") or event.get("eventTime")
        if match and at:
            made[match.group(1)] = str(at)
    return made


def _create_failure(job: Obj, events: list[Obj]) -> Stuck | None:
    """The Job controller's latest FailedCreate Event about this Job, as a Stuck."""
    mine = _job_events(job, events, Reason.FAILED_CREATE)
    if not mine:
        return None

    def when(event: Obj) -> str:
        return str(event.get("lastTimestamp") or event.get("eventTime") or "")

    latest = max(mine, key=when)
    name = (job.get("metadata") or {}).get("name", "")
    said = latest.get("message") or "the Job controller cannot create the pods"
    return Stuck(Reason.FAILED_CREATE, f"Job {name}: {_quote(said)}")


def _failure(cond: Obj, pods: list[Obj], nodes: Nodes, base: Outcome) -> Outcome:
    result = _trainer_result(pods)
    job_reason, job_message = cond.get("reason", ""), cond.get("message", "")
    base = replace(base, failed_at=cond.get("lastTransitionTime") or "")
    final = replace(base, state=State.FAILED, permanent=True, result=result)
    lost = _lost(pods, nodes)
    if job_reason == JOB_DEADLINE_EXCEEDED:
        # Each attempt's Job gets what is left of the whole job's budget: no attempt can follow.
        message = "runPolicy.activeDeadlineSeconds (for the whole job) ran out during attempt "
        return replace(
            final,
            reason=Reason.DEADLINE_EXCEEDED,
            message=f"{message}{base.attempt}: {job_message}"[:1024],
        )
    if result is not None and not result.succeeded and result.permanent:
        return replace(final, reason=result.reason, message=result.message)
    if (evicted := _storage_eviction(pods)) is not None:
        return replace(final, reason=Reason.INVALID_SPEC, message=evicted[:1024])
    # A permanent verdict of the trainer stands; otherwise an OOM kill says more than the
    # other ranks' results, which only saw their peer vanish.
    if (oom := _oom_kill(pods)) is not None:
        permanent, message = oom
        disruption, at = ("", "") if permanent else _disruption(pods, lost)
        return replace(
            final,
            permanent=permanent,
            reason=Reason.OOM_KILLED,
            message=message,
            disruption=disruption,
            disruption_at=at,
        )
    if job_reason == POD_FAILURE_POLICY:
        # A permanent exit code, but its result is gone (the pods were removed): still final.
        message = "a rank exited with a permanent exit code and its result was lost: "
        return replace(
            final, reason=Reason.TRAINING_FAILED, message=f"{message}{job_message}"[:1024]
        )
    message = (result.message if result else "") or _crash_message(pods) or job_message
    prefix = job_reason not in ("", JOB_BACKOFF_LIMIT_EXCEEDED)
    detail = f"{job_reason}: {message}" if prefix else message
    disruption, at = _disruption(pods, lost)
    reason = result.reason if result and result.reason else Reason.TRAINING_FAILED
    known_lost = {node.node for node in lost}
    silent = [p for p in _unheard(pods) if p["spec"]["nodeName"] not in known_lost]
    unheard = ""
    if reason == Reason.COLLECTIVE_TIMEOUT and not disruption and silent:
        unheard = f"pod {_name(silent[0])} on node {silent[0]['spec']['nodeName']}"
    return replace(
        base,
        state=State.FAILED,
        reason=reason,
        message=detail[:1024],
        result=result,
        disruption=disruption,
        disruption_at=at,
        unheard=unheard,
    )


def observe_job(
    job: Obj | None,
    pods: list[Obj],
    events: list[Obj] | None = None,
    nodes: Nodes | None = None,
) -> Outcome:
    """`events`: the Job's FailedCreate Events, read when `needs_events` says so; `nodes`: the
    Nodes `nodes_to_read` names."""
    if job is None:
        return Outcome(State.ABSENT)
    meta = job.get("metadata") or {}
    base = Outcome(
        State.PENDING,
        attempt=naming.attempt_of(job),
        uid=meta.get("uid"),
        pod_times=timings.pod_times(pods, _parallelism(job)),
    )
    if meta.get("deletionTimestamp"):
        # Foreground deletion keeps the Job until its pods are gone: wait, never act on it.
        return replace(base, deleting=True, lingering=_lingering(pods))
    conds = true_conditions(job)
    if "Complete" in conds:
        result = _trainer_result(pods)
        if result is not None and not result.succeeded:
            return replace(
                base,
                state=State.FAILED,
                permanent=True,
                reason=result.reason or Reason.TRAINING_FAILED,
                message=result.message or "",
                result=result,
            )
        return replace(base, state=State.SUCCEEDED, reason=Reason.TRAINING_COMPLETED, result=result)
    for kind in ("Failed", "FailureTarget"):
        if kind in conds:
            # The pods listed, and those the Job made and deleted since (its Events).
            made = _made_by_events(job, events or [])
            made.update({_name(p): _created(p) or "" for p in pods})
            return _failure(conds[kind], pods, nodes or {}, replace(base, made=made))
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    live = sum(1 for phase in phases if phase not in ("Succeeded", "Failed"))
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if (job.get("spec") or {}).get("suspend"):
        # Suspended, but not stopped until `live` is 0: the Job controller deletes the pods, each
        # trainer gets SIGTERM, saves a checkpoint and exits (reason Interrupted).
        return replace(base, state=State.SUSPENDED, running_pods=len(running), live_pods=live)
    rank0 = next((p for p in running if _index(p) == 0), None)
    ip = (rank0.get("status") or {}).get("podIP") if rank0 else None
    state = State.RUNNING if running else State.PENDING
    lost = _lost(pods, nodes or {})
    stuck = _stuck(pods)
    if stuck is None and events and len(pods) < _parallelism(job):
        stuck = _create_failure(job, events)
    return replace(
        base,
        state=state,
        running_pods=len(running),
        live_pods=live,
        rank0_ip=ip,
        rank0_pod=_name(rank0) if rank0 else "",
        stuck=stuck,
        unstarted=max(_parallelism(job) - len(running), 0),
        unmade=max(_parallelism(job) - len(pods), 0),
        leaving=_leaving(pods, lost),
        evicted=_storage_eviction(pods) or "",
        made={
            _name(p): _created(p) or ""
            for p in pods
            if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            and not (p.get("metadata") or {}).get("deletionTimestamp")
        },
        node_not_ready=min(lost, key=lambda n: n.since) if running and lost else None,
    )
