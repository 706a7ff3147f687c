"""Child names and labels, in one place.

Every child is named after the FineTuneJob itself: the headless Service, the ConfigMap and the
Indexed Job are all `<name>`, so the pods' hostnames are `<name>-<index>`. MASTER_ADDR is the
Service `<name>-rendezvous`, whose one virtual IP leads to whichever pod has completion index 0:
it never changes, and its name always resolves. (Rank 0's pod DNS name `<name>-0.<name>` has no
record while that pod is being replaced, and a resolver that asked then caches the "no such
name" for up to 30 s.)

Attempts therefore reuse the Job name: attempt n+1 is created only after attempt n's Job is gone
(foreground deletion, so its pods are gone too and no two gangs share a hostname). The attempt
number lives in the `finetune.dev/attempt` label on the Job and its pods, and `status.attempts`
is the attempt that should exist. This makes restarts deterministic and idempotent: whatever the
operator sees after a crash, "Job attempt < status.attempts" means delete, "no Job" means create
attempt `status.attempts`.
"""

from __future__ import annotations

from finetune_api.constants import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
)

MANAGER = "finetune-operator"
FIELD_MANAGER = MANAGER
COMPONENT_TRAINER = "trainer"
# The Job controller's annotation/label carrying a pod's completion index.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The pods' /tmp emptyDir, sized by spec.template.cacheSize: the Hugging Face cache, and the
# artifact before its push.
CACHE_VOLUME = "tmp"
# The label on a checkpoint claim the operator released when its FineTuneJob ended
# (checkpoints.py): the uid of that FineTuneJob. A FineTuneJob made again with the same name
# adopts such a claim; `kubectl get pvc -l finetune.dev/retained-from` lists the claims kept.
RETAINED_FROM = "finetune.dev/retained-from"
# ... and the annotation that says when (RFC 3339): the operator's retained-claim metrics and
# their alert count a kept claim's age from it.
RETAINED_AT = "finetune.dev/retained-at"


def service_name(job_name: str) -> str:
    return job_name


def configmap_name(job_name: str) -> str:
    return job_name


def batch_job_name(job_name: str) -> str:
    return job_name


def checkpoint_claim_name(job_name: str) -> str:
    """The ReadWriteOnce claim the operator makes for a one-node gang's checkpoints."""
    return f"{job_name}-checkpoints"


def rendezvous_service_name(job_name: str) -> str:
    """The ClusterIP Service in front of completion index 0 (rank 0's pod)."""
    return f"{job_name}-rendezvous"


def master_addr(job_name: str) -> str:
    """Where every rank finds rank 0's rendezvous store: the rendezvous Service, which stays
    (and resolves) while rank 0's pod is replaced."""
    return rendezvous_service_name(job_name)


def selector_labels(job_name: str) -> dict[str, str]:
    """Labels that select every child of one FineTuneJob (and nothing else)."""
    return {LABEL_MANAGED_BY: MANAGER, LABEL_JOB_NAME: job_name}


def child_labels(job_name: str) -> dict[str, str]:
    return {**selector_labels(job_name), LABEL_COMPONENT: COMPONENT_TRAINER}


def attempt_labels(job_name: str, attempt: int) -> dict[str, str]:
    return {**child_labels(job_name), LABEL_ATTEMPT: str(attempt)}


def attempt_of(obj: dict) -> int:
    """The attempt a Job or pod belongs to; 0 when unlabeled (not ours)."""
    raw = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT, "0")
    try:
        return int(raw)
    except ValueError:
        return 0


# ---- serving (spec.serve) -----------------------------------------------------------------------
# The serving Deployment's pods carry neither the job-name label nor the attempt label: the
# trainers' headless Service, their pod listing and a gang's anti-affinity select on those, and
# must never count a server.
COMPONENT_SERVER = "server"
LABEL_SERVED_JOB = "finetune.dev/served-job"
# The pushed commit a serving Deployment (and its pod template) was rendered for.
ANNOTATION_SERVE_REVISION = "finetune.dev/revision"


def serve_name(job_name: str) -> str:
    """The serving Deployment and its Service (50 + 6 characters: a valid DNS label)."""
    return f"{job_name}-serve"


def serve_labels(job_name: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_COMPONENT: COMPONENT_SERVER,
        LABEL_SERVED_JOB: job_name,
    }
