"""Names that the CRD, the operator and the trainer must agree on."""

from enum import IntEnum, StrEnum
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

LABEL_PREFIX: Final = GROUP
LABEL_JOB_NAME: Final = f"{GROUP}/job-name"
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"

# The trainer serves Prometheus metrics here in every pod; the operator scrapes rank 0's.
TRAINER_METRICS_PORT: Final = 9400
# torch.distributed rendezvous port on rank 0's pod.
RENDEZVOUS_PORT: Final = 29500
DEFAULT_RESULT_FILE: Final = "/dev/termination-log"


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


class Reason(StrEnum):
    """CamelCase condition reasons, shared by the trainer's result and the operator's status."""

    INVALID_SPEC = "InvalidSpec"
    APPLY_REJECTED = "ApplyRejected"
    WORKLOAD_CREATED = "WorkloadCreated"
    PODS_RUNNING = "PodsRunning"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
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


class ExitCode(IntEnum):
    """Trainer exit codes; the Job's podFailurePolicy fails the gang at once on permanent ones."""

    OK = 0
    RETRYABLE = 1
    INVALID_SPEC = 3
    GATE_FAILED = 4


PERMANENT_EXIT_CODES: Final = (ExitCode.INVALID_SPEC, ExitCode.GATE_FAILED)
