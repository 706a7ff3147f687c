"""Where a FineTuneJob's checkpoints live, so that a restarted gang resumes. Pure.

Only rank 0 writes and reads checkpoints (the other ranks get the state by broadcast), so the
store must reach rank 0's pod wherever it lands:

1. the user's claim (`output.checkpoints.persistentVolumeClaim`), mounted on every pod;
2. for a one-node gang, a ReadWriteOnce claim the operator makes from the default (or the
   named) StorageClass, owned by the FineTuneJob. A multi-node gang cannot use one: every pod of
   an Indexed Job shares one template, so the claim would be mounted on every node, which
   ReadWriteOnce volumes (local-path, block disks) refuse;
3. for a multi-node gang with `output.hub`, a branch of the target repo that rank 0 mirrors each
   checkpoint to (transformers' `hub_strategy="checkpoint"`, on a branch so that `main` holds
   only results);
4. otherwise an emptyDir: restarts begin again at step 0, and the CheckpointsDurable condition
   says so rather than leaving it to be found out.

The choice is made once, when the first Job is created, and kept in status.checkpoints: a store
that changed between attempts would strand the checkpoints written so far.

The claim the operator makes can outlive its FineTuneJob, as a StatefulSet's claims do
(`output.checkpoints.claimRetentionPolicy`): once the job has ended as the policy says to keep
it (`retains_claim`), the operator releases the claim, and a FineTuneJob made again with the
same name adopts it (`adoptable`), so a job made again after a failure resumes where the last
one stopped instead of at step 0. The job's folder on the claim is keyed by its name and its
training spec, never by its uid.

A stop (SIGTERM) saves one more checkpoint, at the step the gang is on, within the pods'
termination grace period; `saves_on_stop` says whether what rank 0 measured fits in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.utils.quantity import parse_quantity

from finetune_api.constants import LABEL_JOB_NAME, Phase, Reason
from finetune_api.v1alpha1 import FineTuneJob
from finetune_operator import naming
from finetune_operator.timings import unix

StoreKind = Literal["Volume", "HubBranch", "Ephemeral"]


@dataclass(frozen=True)
class CheckpointStore:
    kind: StoreKind
    # The claim mounted at the checkpoint folder, for kind Volume.
    claim_name: str | None = None
    # Whether the operator makes that claim (and it is owned by the FineTuneJob).
    owned_claim: bool = False
    # The branch of output.hub.repo that rank 0 mirrors to, for kind HubBranch.
    hub_branch: str | None = None

    @property
    def durable(self) -> bool:
        return self.kind != "Ephemeral"

    def condition(self) -> tuple[bool, Reason, str]:
        """(status, reason, message) of the CheckpointsDurable condition."""
        if self.kind == "Volume":
            whose = "made for this job" if self.owned_claim else "from output.checkpoints"
            return (
                True,
                Reason.CHECKPOINT_VOLUME,
                f"PersistentVolumeClaim {self.claim_name} ({whose})",
            )
        if self.kind == "HubBranch":
            return (
                True,
                Reason.CHECKPOINT_HUB_BRANCH,
                f"branch {self.hub_branch} of output.hub.repo",
            )
        return (
            False,
            Reason.NO_DURABLE_STORE,
            "checkpoints are in an emptyDir and a restart begins again at step 0: set "
            "output.checkpoints.persistentVolumeClaim (ReadWriteMany for more than one node), "
            "output.hub, or give the cluster a default StorageClass",
        )

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"store": self.kind}
        if self.claim_name:
            status["claimName"] = self.claim_name
        if self.hub_branch:
            status["hubBranch"] = self.hub_branch
        return status


def choose(job: FineTuneJob, default_storage_class: bool) -> CheckpointStore:
    """The store for a job's checkpoints, given whether the cluster has a default StorageClass."""
    spec = job.spec
    ckpt = spec.output.checkpoints
    if ckpt.persistent_volume_claim is not None:
        return CheckpointStore("Volume", claim_name=ckpt.persistent_volume_claim.claim_name)
    if spec.resources.nodes == 1 and (ckpt.storage_class_name or default_storage_class):
        claim = naming.checkpoint_claim_name(job.metadata.name)
        return CheckpointStore("Volume", claim_name=claim, owned_claim=True)
    if spec.output.hub is not None:
        return CheckpointStore("HubBranch", hub_branch=ckpt.hub_branch)
    return CheckpointStore("Ephemeral")


def may_own_claim(spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """From a FineTuneJob's raw spec and status (a kopf filter's, not parsed): whether its
    checkpoints are, or may yet be, on a claim the operator makes (`choose`): a one-node gang
    without a claim of its own, whose store, once recorded, is a volume."""
    ckpt = (spec.get("output") or {}).get("checkpoints") or {}
    nodes = (spec.get("resources") or {}).get("nodes", 1)
    recorded = (status.get("checkpoints") or {}).get("store")
    return nodes == 1 and not ckpt.get("persistentVolumeClaim") and recorded in (None, "Volume")


def from_status(job: FineTuneJob, recorded: dict[str, Any]) -> CheckpointStore | None:
    """The store chosen for an earlier attempt, as status.checkpoints recorded it."""
    kind = recorded.get("store")
    if kind not in ("Volume", "HubBranch", "Ephemeral"):
        return None
    owned = kind == "Volume" and job.spec.output.checkpoints.persistent_volume_claim is None
    return CheckpointStore(
        kind,
        claim_name=recorded.get("claimName"),
        owned_claim=owned,
        hub_branch=recorded.get("hubBranch"),
    )


def needs_storage_class_check(job: FineTuneJob) -> bool:
    """Whether `choose` depends on the cluster's default StorageClass for this job."""
    ckpt = job.spec.output.checkpoints
    return (
        ckpt.persistent_volume_claim is None
        and ckpt.storage_class_name is None
        and job.spec.resources.nodes == 1
    )


def class_not_found(wanted: str, classes: dict[str, bool]) -> str:
    """What to do about output.checkpoints.storageClassName naming no StorageClass of the
    cluster (`classes`: each one's name, and whether it is the default)."""
    names = sorted(classes)
    have = ", ".join(f"{n} (default)" if classes[n] else n for n in names[:10])
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return (
        f"StorageClass {wanted} (output.checkpoints.storageClassName) not found; the cluster "
        f"has {have + more if names else 'none'}. Create it (the job waits for it), or make the "
        "FineTuneJob again naming one of those, or none for the default"
    )


def retains_claim(job: FineTuneJob, phase: str | None) -> bool:
    """Whether the claim the operator made for `job` is to outlive it, now that it is in `phase`
    (output.checkpoints.claimRetentionPolicy; a job still running keeps its claim owned)."""
    policy = job.spec.output.checkpoints.claim_retention_policy
    if phase == Phase.FAILED:
        return policy.when_failed == "Retain"
    if phase == Phase.SUCCEEDED:
        return policy.when_succeeded == "Retain"
    return False


def retained_from(claim: dict[str, Any]) -> str | None:
    """The uid of the FineTuneJob that released `claim`, while nothing controls it."""
    meta = claim.get("metadata") or {}
    if any(ref.get("controller") for ref in meta.get("ownerReferences") or []):
        return None
    return (meta.get("labels") or {}).get(naming.RETAINED_FROM) or None


def retention_marks(uid: str | None, at: str | None) -> dict[str, Any]:
    """The metadata (a merge patch) that marks a claim released by the FineTuneJob of `uid` at
    RFC 3339 time `at`, or, with None for both, that clears those marks as a job adopts it."""
    return {"labels": {naming.RETAINED_FROM: uid}, "annotations": {naming.RETAINED_AT: at}}


@dataclass(frozen=True)
class RetainedClaim:
    """A claim the operator released and no FineTuneJob has adopted: storage that a platform
    team sees in the operator's metrics until someone resumes from it or deletes it."""

    namespace: str
    name: str
    job_name: str
    # Its capacity once bound, else what it requests.
    size_bytes: float
    # Unix seconds it was released: its retained-at annotation, else (a claim released before
    # the annotation existed) its creation, the earliest it can have been.
    since: float


def retained_claim(claim: dict[str, Any]) -> RetainedClaim | None:
    """The RetainedClaim a claim of the operator's is, or None while a FineTuneJob holds it (or
    it is being deleted)."""
    meta = claim.get("metadata") or {}
    if retained_from(claim) is None or meta.get("deletionTimestamp"):
        return None
    capacity = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
    size = capacity or requested_size(claim)
    annotations = meta.get("annotations") or {}
    since = unix(annotations.get(naming.RETAINED_AT)) or unix(meta.get("creationTimestamp"))
    return RetainedClaim(
        namespace=meta["namespace"],
        name=meta["name"],
        job_name=(meta.get("labels") or {}).get(LABEL_JOB_NAME, ""),
        size_bytes=float(parse_quantity(size)) if size is not None else 0.0,
        since=since or 0.0,
    )


def adoptable(claim: dict[str, Any], job_name: str) -> bool:
    """Whether `claim` is one the operator made for a FineTuneJob named `job_name` and released
    when it ended, which a FineTuneJob of that name may take as its own."""
    labels = (claim.get("metadata") or {}).get("labels") or {}
    ours = all(labels.get(k) == v for k, v in naming.selector_labels(job_name).items())
    return ours and retained_from(claim) is not None


def adoption_refused(claim: dict[str, Any], job: FineTuneJob) -> str | None:
    """Why `job` may not adopt the kept `claim` (another StorageClass than it names), or None."""
    wanted = job.spec.output.checkpoints.storage_class_name
    held = (claim.get("spec") or {}).get("storageClassName")
    if wanted is None or wanted == held:
        return None
    name = claim["metadata"]["name"]
    return (
        f"PersistentVolumeClaim {name}, kept from an earlier FineTuneJob named "
        f"{job.metadata.name}, is of StorageClass {held}, not output.checkpoints."
        f"storageClassName {wanted}: make the FineTuneJob with storageClassName {held} to "
        f"resume from what the claim holds, or delete the claim (kubectl delete pvc {name}) "
        "to start afresh"
    )


def requested_size(claim: dict[str, Any]) -> str | None:
    """The storage `claim` requests (a quantity: what it was made or last expanded to)."""
    requests = ((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}
    held = requests.get("storage")
    return None if held is None else str(held)


def needs_expansion(claim: dict[str, Any], job: FineTuneJob) -> bool:
    """Whether `job` asks for a larger claim (output.checkpoints.size) than `claim` requests."""
    held = requested_size(claim)
    size = job.spec.output.checkpoints.size
    return held is not None and parse_quantity(size) > parse_quantity(held)


def saves_on_stop(job: FineTuneJob, stop_seconds: float) -> tuple[bool, Reason, str]:
    """(status, reason, message) of the SavesOnStop condition, given rank 0's estimate of what a
    stop takes (its longest recent step plus its last checkpoint's save and upload): whether
    that fits in the pods' termination grace period, after which the kubelet kills the save."""
    grace = job.spec.template.grace_period_seconds()
    need = math.ceil(stop_seconds)
    if stop_seconds <= grace:
        return (
            True,
            Reason.WITHIN_GRACE_PERIOD,
            f"a stop ends its step and saves a checkpoint in about {need} s (rank 0's longest "
            f"recent step and last save), within the pods' termination grace period of {grace} s",
        )
    # Room for the step and the save to grow, and for the processes' exit after them.
    suggest = math.ceil(stop_seconds * 2 / 30) * 30
    return (
        False,
        Reason.GRACE_PERIOD_TOO_SHORT,
        f"a stop needs about {need} s to end its step and save a checkpoint (rank 0's longest "
        "recent step and last save), more than the pods' termination grace period of "
        f"{grace} s: a deletion, eviction, preemption, drain or suspend kills the save, and the "
        "gang resumes from the last periodic checkpoint instead. Set "
        f"spec.template.terminationGracePeriodSeconds well above it (say {suggest}) when this "
        "FineTuneJob is next made",
    )
