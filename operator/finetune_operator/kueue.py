"""Kueue's side of a queued FineTuneJob: the Workload of its Job, found and read. Pure.

With `runPolicy.queueName` the Job carries the label kueue.x-k8s.io/queue-name and is born
suspended. Kueue then owns `Job.spec.suspend`: it unsuspends the Job to admit it and suspends
it again to evict it, so the operator never writes that field. What Kueue leaves to others is
its Workload's `spec.active`: false makes Kueue evict the workload (condition Evicted, reason
Deactivated; Kueue suspends the Job, whose pods get SIGTERM) and keep it out of the queue;
true puts it back in the queue to be admitted again.

Kueue makes one Workload per Job, in the Job's namespace, named `job-<job name>-<hash>` and
labelled kueue.x-k8s.io/job-uid=<the Job's uid>, with a controller ownerReference to the Job
(sigs.k8s.io/kueue pkg/controller/jobframework: ConstructWorkload, GetWorkloadNameForOwnerWithGVK).
The name's shape depends on Kueue's version and features, so the operator finds it as Kueue
does: by that label, and then by the ownerReference, which alone is proof.

Workloads are read and patched at the version of kueue.x-k8s.io that the API server prefers:
v1beta2 where Kueue serves it (v0.17 stores v1beta2 and deprecates v1beta1), v1beta1 in older
releases. Every field used here has the same name and meaning in both. The deprecated version is
avoided on purpose: with Kueue v0.17.0's own Workload CRD (installed without Kueue's conversion
webhook, in tests/controlplane/test_suspend.py), the API server refused a v1beta1 merge patch of
spec.active on an admitted Workload, because a v1beta1 validation rule reads
`spec.priorityClassSource`, a field the v1beta2 storage does not keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from finetune_api.constants import LABEL_JOB_NAME, LABEL_MANAGED_BY
from finetune_operator import lifecycle, naming

Obj = dict[str, Any]

GROUP: Final = "kueue.x-k8s.io"
PLURAL: Final = "workloads"
# The label Kueue puts on a Job's Workload: the Job's uid.
LABEL_JOB_UID: Final = "kueue.x-k8s.io/job-uid"
# Kueue's Workload condition types and its reason for a deactivated workload's eviction.
QUOTA_RESERVED: Final = "QuotaReserved"
ADMITTED: Final = "Admitted"
EVICTED: Final = "Evicted"
DEACTIVATED: Final = "Deactivated"


class Lookup(StrEnum):
    """What looking for the Job's Workload found."""

    FOUND = "Found"
    # Kueue is installed but has not made the Workload yet (it does so right after the Job).
    NOT_YET = "NotYet"
    # The API server does not serve workloads.kueue.x-k8s.io: Kueue is not installed.
    NO_KUEUE = "NoKueue"
    # 403: the operator may not read Workloads (its RBAC lacks them).
    FORBIDDEN = "Forbidden"


@dataclass(frozen=True)
class Workload:
    """The Job's Workload as Kueue reports it."""

    lookup: Lookup
    name: str = ""
    uid: str = ""
    active: bool = True
    quota_reserved: bool = False
    admitted: bool = False
    cluster_queue: str = ""
    # (reason, message) of Evicted=True: why Kueue took the workload back.
    evicted: tuple[str, str] | None = None
    # Why it is not admitted yet: QuotaReserved=False's message (e.g. insufficient quota).
    pending: str = ""
    # The API server's refusal of this pass's change of spec.active (not tried again this pass).
    refused: str = ""

    @property
    def deactivated(self) -> bool:
        return self.lookup is Lookup.FOUND and not self.active

    def where(self) -> str:
        """Says what the operator could (not) reach, for a condition message."""
        return {
            Lookup.FOUND: f"Kueue Workload {self.name}",
            Lookup.NOT_YET: "Kueue has not created the Job's Workload yet",
            Lookup.NO_KUEUE: "workloads.kueue.x-k8s.io is not served (is Kueue installed?)",
            Lookup.FORBIDDEN: "the operator may not read Kueue Workloads (RBAC)",
        }[self.lookup]


def owned_by(items: list[Obj], job_uid: str) -> Obj | None:
    """The Workload whose controller ownerReference is the Job `job_uid`, if any."""
    for item in items:
        refs = (item.get("metadata") or {}).get("ownerReferences") or []
        if job_uid and any(r.get("controller") and r.get("uid") == job_uid for r in refs):
            return item
    return None


def read(lookup: Lookup, obj: Obj | None) -> Workload:
    """The Workload view of what `apply.Kube.find_workload` returned."""
    if lookup is not Lookup.FOUND or obj is None:
        return Workload(lookup if lookup is not Lookup.FOUND else Lookup.NOT_YET)
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    conditions = status.get("conditions") or []
    true = lifecycle.true_conditions(obj)
    evicted = true.get(EVICTED)
    reserved = next((c for c in conditions if c.get("type") == QUOTA_RESERVED), None)
    pending = ""
    if reserved is not None and reserved.get("status") != "True":
        pending = str(reserved.get("message") or "")
    return Workload(
        Lookup.FOUND,
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        # The field defaults to true, and Kueue's API leaves it unset until someone sets it.
        active=spec.get("active") is not False,
        quota_reserved=QUOTA_RESERVED in true,
        admitted=ADMITTED in true,
        cluster_queue=str((status.get("admission") or {}).get("clusterQueue") or ""),
        evicted=(
            (str(evicted.get("reason") or ""), str(evicted.get("message") or ""))
            if evicted
            else None
        ),
        pending=pending[:512],
    )


def finetunejob_of(workload: Obj) -> str | None:
    """The FineTuneJob whose Job owns this Workload, from the pod template Kueue copied into it
    (its labels name the FineTuneJob); None for any other Workload."""
    for pod_set in (workload.get("spec") or {}).get("podSets") or []:
        labels = ((pod_set.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) == naming.MANAGER and labels.get(LABEL_JOB_NAME):
            return str(labels[LABEL_JOB_NAME])
    return None
