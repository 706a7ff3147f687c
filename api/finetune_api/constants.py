"""Names that the CRD, the operator and the trainer must agree on."""

from enum import StrEnum
from typing import Final

GROUP: Final = "finetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CATEGORIES: Final = ("ml",)

# Every child name is `<ftj name>` or `<ftj name>-<suffix>`, and an Indexed Job's pod hostname
# is `<job name>-<index>`: 50 characters leave room for both inside a 63-character DNS label.
MAX_NAME_LENGTH: Final = 50

LABEL_JOB_NAME: Final = f"{GROUP}/job-name"
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ConditionType(StrEnum):
    CREATED = "Created"
    RUNNING = "Running"
    EVALUATED = "Evaluated"
    PUSHED = "Pushed"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    # Whether checkpoints outlive the gang (a volume or a Hub branch), so a restart resumes.
    CHECKPOINTS_DURABLE = "CheckpointsDurable"
    # Whether a stop (SIGTERM: a deletion, eviction, preemption, drain or suspend) can end its
    # step and save a checkpoint within the pods' termination grace period, from what rank 0
    # measured; unset until its first save.
    SAVES_ON_STOP = "SavesOnStop"


class Reason(StrEnum):
    """Every CamelCase condition reason: the closed set that the trainer's result and the
    operator's status draw from (the Failed reasons are also the jobs_failed_total labels)."""

    INVALID_SPEC = "InvalidSpec"
    APPLY_REJECTED = "ApplyRejected"
    SECRET_NOT_FOUND = "SecretNotFound"
    # Created=False: output.checkpoints.storageClassName names no StorageClass of the cluster.
    STORAGE_CLASS_NOT_FOUND = "StorageClassNotFound"
    # Created=False: a ResourceQuota of the namespace refused a child the operator creates (the
    # Job, its claim, a Service or the ConfigMap); it is tried again until the quota has room.
    QUOTA_EXCEEDED = "QuotaExceeded"
    WORKLOAD_CREATED = "WorkloadCreated"
    QUEUED = "Queued"
    PODS_RUNNING = "PodsRunning"
    SUSPENDED = "Suspended"
    # runPolicy.suspend is true, and the pods are still saving their checkpoint (SIGTERM).
    SUSPENDING = "Suspending"
    RESUMED = "Resumed"
    # Kueue admitted the queued Job (it unsuspended it); its pods are not running yet.
    ADMITTED = "Admitted"
    # The queued Job's Kueue Workload is deactivated (spec.active=false) by someone else.
    DEACTIVATED = "Deactivated"
    EVALUATION_GATE_FAILED = "EvaluationGateFailed"
    EVALUATED = "EvaluationCompleted"
    PUSHED = "PushedToHub"
    PUSH_FAILED = "PushFailed"
    TRAINING_COMPLETED = "TrainingCompleted"
    TRAINING_FAILED = "TrainingFailed"
    INTERRUPTED = "Interrupted"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    RESTARTING = "Restarting"
    # Running=False: a pod of the attempt being deleted for a restart outlived its termination
    # grace period (its node does not answer, or a finalizer holds it); the next attempt waits.
    POD_STUCK_TERMINATING = "PodStuckTerminating"
    # Running=False: a running pod's node is not ready (its kubelet stopped answering): its rank
    # may be lost with it. The other ranks end the attempt after runPolicy.hangTimeoutSeconds,
    # or, in a phase they do not time, the gang restarts once Kubernetes evicts the pod.
    NODE_NOT_READY = "NodeNotReady"
    # A child with this FineTuneJob's name exists and is not controlled by it: left untouched.
    NAME_CONFLICT = "NameConflict"
    # A source the Hub (or the endpoint used) says does not exist: retrying cannot help.
    MODEL_NOT_FOUND = "ModelNotFound"
    DATASET_NOT_FOUND = "DatasetNotFound"
    # The dataset cannot be read or does not fit the spec (a missing column, a file that does not
    # parse, an error while shaping its rows): the same data fails the same way every attempt.
    INVALID_DATASET = "InvalidDataset"
    # No training step completed within runPolicy.hangTimeoutSeconds (or 3 x p99 step time): a
    # rank hung in a collective or was stopped. The gang restarts from its checkpoint.
    COLLECTIVE_TIMEOUT = "CollectiveTimeout"
    # The pod asked for accelerators (resources.accelerator) that its trainer cannot use: no
    # visible CUDA device, fewer than processesPerNode, or a TPU, which this image cannot drive.
    ACCELERATOR_UNAVAILABLE = "AcceleratorUnavailable"
    # A trainer container was killed by the kernel for memory (containerStatuses reason).
    OOM_KILLED = "OOMKilled"
    # torch could not allocate on a rank's device (a GPU's memory full): the same spec peaks the
    # same way on the same devices, so it is permanent; the message names the fields to lower.
    DEVICE_OUT_OF_MEMORY = "DeviceOutOfMemory"
    # Running=False while a pod of the attempt cannot start, with the reason Kubernetes gives: a
    # container waiting reason (the kubelet's), PodScheduled=False (the scheduler's; a missing
    # claim is one), or FailedCreate (the Job controller's Event: its pods cannot be created).
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    ERR_IMAGE_PULL = "ErrImagePull"
    ERR_IMAGE_NEVER_PULL = "ErrImageNeverPull"
    INVALID_IMAGE_NAME = "InvalidImageName"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_CONTAINER_ERROR = "CreateContainerError"
    UNSCHEDULABLE = "Unschedulable"
    FAILED_CREATE = "FailedCreate"
    # Running=False: the pods are on their way (scheduled, pulling) and none is stuck any more.
    PODS_PENDING = "PodsPending"
    # Failed: a pod was still stuck as above runPolicy.pendingTimeoutSeconds after its Job started.
    PENDING_TIMEOUT = "PendingTimeout"
    # CheckpointsDurable: where checkpoints live.
    CHECKPOINT_VOLUME = "CheckpointVolume"
    CHECKPOINT_HUB_BRANCH = "CheckpointHubBranch"
    NO_DURABLE_STORE = "NoDurableStore"
    # SavesOnStop: a step and a save fit in the grace period, or they do not.
    WITHIN_GRACE_PERIOD = "WithinGracePeriod"
    GRACE_PERIOD_TOO_SHORT = "GracePeriodTooShort"
    # Events about the claim the operator made (output.checkpoints.claimRetentionPolicy): released
    # from its ended FineTuneJob, and adopted by one made again with the same name.
    CLAIM_RETAINED = "ClaimRetained"
    CLAIM_ADOPTED = "ClaimAdopted"
