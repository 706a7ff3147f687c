"""The checkpoint claim the operator makes for a one-node gang, past its creation: released from
an ended FineTuneJob that output.checkpoints.claimRetentionPolicy keeps it for (or from one
deleted before it ended, once its gang has stopped: whenDeleted), and adopted by a FineTuneJob
made again with the same name, which resumes from what it holds (checkpoints.py has the pure
rules; this module carries them out through the one API layer, apply.Kube).

Releasing and adopting are merge patches of the claim's ownerReferences and its retained-from
label and retained-at annotation, each pinned to the resourceVersion read, so a claim that
changed in between is read again rather than overwritten.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from finetune_api.constants import ConditionType, Phase, Reason
from finetune_api.v1alpha1 import FineTuneJob
from finetune_operator import checkpoints, naming
from finetune_operator.apply import ApplyRejected, Kube, controlled_by
from finetune_operator.checkpoints import CheckpointStore
from finetune_operator.status import Blocker, Plan

log = logging.getLogger(__name__)
Obj = dict[str, Any]


async def ensure(
    kube: Kube, body: Obj, job: FineTuneJob, manifest: Obj, owner: Obj
) -> Obj | Blocker | None:
    """As `Kube.ensure` for the checkpoint claim: created once and never applied (a claim's spec
    is immutable once bound); the object holding its name when it is not ours. A claim an
    earlier FineTuneJob of this name left behind is adopted, and this job resumes from what it
    holds; a Blocker when it may not be (checkpoints.adoption_refused), or when the API server
    refuses the claim (a LimitRange's maximum, a policy)."""
    try:
        claim = await kube.create_claim(manifest)
    except ApplyRejected as exc:
        fields = "spec.output.checkpoints.size and storageClassName make this claim"
        return Blocker(Reason.APPLY_REJECTED, f"{exc} ({fields})", permanent=True)
    if controlled_by(claim, owner["uid"]):
        return None
    if not checkpoints.adoptable(claim, job.metadata.name):
        return claim
    if (refused := checkpoints.adoption_refused(claim, job)) is not None:
        return Blocker(Reason.NAME_CONFLICT, refused, permanent=True)
    before, name = checkpoints.retained_from(claim), claim["metadata"]["name"]
    unmarked = checkpoints.retention_marks(None, None)
    if await kube.set_claim_owner(claim, [owner], unmarked) is None:
        raise RuntimeError(f"PersistentVolumeClaim {name} changed while it was adopted; retry")
    message = (
        f"adopted PersistentVolumeClaim {name}, kept from the FineTuneJob of this name with uid "
        f"{before}: the job resumes from its newest checkpoint, or pushes its kept result"
    )
    if checkpoints.needs_expansion(claim, job):
        size = str(job.spec.output.checkpoints.size)
        refused = await kube.expand_claim(job.metadata.namespace, name, size)
        message += (
            f"; expanding it to output.checkpoints.size {size}"
            if refused is None
            else f"; it stays {checkpoints.requested_size(claim)}, as it cannot be expanded to "
            f"output.checkpoints.size {size}: {refused}"
        )
    log.info("%s/%s: %s", job.metadata.namespace, job.metadata.name, message)
    await kube.post_event(body, "Normal", Reason.CLAIM_ADOPTED, message)
    return None


async def release_ended(
    kube: Kube, job: FineTuneJob, store: CheckpointStore, result: Plan, now: str
) -> Plan:
    """Once the job has ended, record in status.checkpoints.claimRetained whether the claim the
    operator made for it outlives it: where claimRetentionPolicy keeps it, it is released from
    the job's ownership first, marked retained at `now` (RFC 3339), and an Event says so, so
    that deleting the FineTuneJob leaves it. Before the status write, so a lost write means
    another try."""
    ckpt = result.status.get("checkpoints") or {}
    phase = result.status.get("phase")
    ended = phase in (Phase.SUCCEEDED, Phase.FAILED)
    if not ended or not store.owned_claim or ckpt.get("claimRetained") is not None:
        return result
    claim = None
    if checkpoints.retains_claim(job, phase):
        claim = await _release(kube, job, store.claim_name or "", now)
    status = {**result.status, "checkpoints": {**ckpt, "claimRetained": claim is not None}}
    if claim is None:
        return replace(result, status=status)
    when = "whenFailed" if phase == Phase.FAILED else "whenSucceeded"
    message = _retained(claim["metadata"]["name"], when)
    event = (ConditionType.CHECKPOINTS_DURABLE, Reason.CLAIM_RETAINED, message)
    return replace(result, status=status, transitions=[*result.transitions, event])


async def release_deleted(
    kube: Kube, body: Obj, job: FineTuneJob, store: CheckpointStore, now: str, wait: bool
) -> str | None:
    """For a FineTuneJob deleted before it ended with claimRetentionPolicy.whenDeleted: Retain:
    stop its gang (a foreground delete of its Job: each pod gets SIGTERM and saves a
    checkpoint, and the Job goes once its pods have), then release its claim as release_ended
    does, marked retained at `now`. What it still waits for, or None once the claim is kept
    (or there is none of its own). `wait=False` releases the claim without waiting for the gang
    any longer: a pod that never ends (its node is lost) must not keep the FineTuneJob forever,
    and such a pod writes nothing more."""
    if not store.owned_claim:
        return None
    namespace, name, uid = job.metadata.namespace, job.metadata.name, job.metadata.uid or ""
    batch = await kube.get_job(namespace, naming.batch_job_name(name))
    if wait and batch is not None and controlled_by(batch, uid):
        meta = batch["metadata"]
        if not meta.get("deletionTimestamp"):
            await kube.delete_job(namespace, meta["name"], meta["uid"])
        return (
            f"stopping the gang of Job {meta['name']}, whose pods save a checkpoint as they "
            f"go, before keeping PersistentVolumeClaim {store.claim_name} "
            "(output.checkpoints.claimRetentionPolicy.whenDeleted: Retain)"
        )
    claim = await _release(kube, job, store.claim_name or "", now)
    if claim is not None:
        message = _retained(claim["metadata"]["name"], "whenDeleted")
        log.info("%s/%s: %s", namespace, name, message)
        # Once: a pass repeated after a restart mid-deletion finds the claim released already.
        await kube.post_event(body, "Normal", Reason.CLAIM_RETAINED, message, once="claim-retained")
    # Its other children go now rather than with the garbage collector, which may take half a
    # minute once the FineTuneJob is gone: the one made again waits for their names.
    for kind, child in (
        ("ConfigMap", naming.configmap_name(name)),
        ("Service", naming.service_name(name)),
        ("Service", naming.rendezvous_service_name(name)),
    ):
        await kube.delete_owned(kind, namespace, child, uid)
    return None


def _retained(claim: str, when: str) -> str:
    """What the ClaimRetained Event says: the claim outlives the FineTuneJob, by `when`."""
    return (
        f"PersistentVolumeClaim {claim} is kept when this FineTuneJob is deleted "
        f"(output.checkpoints.claimRetentionPolicy.{when}: Retain): a FineTuneJob made again "
        "with the same name and training spec adopts it and resumes from what it holds; "
        f"delete it (kubectl delete pvc {claim}) when none will"
    )


async def _release(kube: Kube, job: FineTuneJob, name: str, now: str) -> Obj | None:
    """Release the job's claim from its ownership: the claim, once released (now or by an
    earlier pass); None when there is none of its own to keep (it was never made, or the name
    is someone else's claim)."""
    namespace, uid = job.metadata.namespace, job.metadata.uid or ""
    for _ in range(3):
        claim = await kube.get_child("PersistentVolumeClaim", namespace, name)
        if claim is None:
            return None
        if checkpoints.retained_from(claim) == uid:
            return claim
        if not controlled_by(claim, uid):
            return None
        refs = claim["metadata"].get("ownerReferences") or []
        owners = [ref for ref in refs if ref["uid"] != uid]
        marks = checkpoints.retention_marks(uid, now)
        if (released := await kube.set_claim_owner(claim, owners, marks)) is not None:
            return released
    raise RuntimeError(f"PersistentVolumeClaim {namespace}/{name} kept changing; retry")
