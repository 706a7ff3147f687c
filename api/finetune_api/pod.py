"""The contract between the operator and the trainer pods it runs: env, paths, ports, exit codes.

The operator renders these into every pod (finetune_operator.podspec); the trainer reads them
(finetune_trainer.env, launch); local mode and the test gang set the same names on processes.
Each name is spelled here once. What a pod reports back is `finetune_api.result.TrainerResult`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Final

# ---- paths inside the pod -----------------------------------------------------------------------
CONTAINER_NAME: Final = "trainer"
CONFIG_DIR: Final = "/etc/finetune"
CONFIG_KEY: Final = "job.yaml"
# The FineTuneJob manifest, from the job's ConfigMap; the container runs `finetune train` on it.
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_KEY}"
CHECKPOINT_DIR: Final = "/checkpoints"
# The root filesystem is read-only: home and the Hugging Face cache live in the /tmp emptyDir.
HOME_DIR: Final = "/tmp"
HF_HOME: Final = "/tmp/hf"
# huggingface_hub's file cache, where the trainer fetches each hf:// source once (keyed by repo and
# commit). Rendered only when the checkpoints are on a volume: then every pod and attempt reads the
# one copy there. Otherwise it is HF_HOME's own (/tmp/hf/hub): one download per attempt, which
# rank 0 sends to the other pods.
HF_HUB_CACHE_ENV: Final = "HF_HUB_CACHE"
SOURCE_CACHE_DIR: Final = f"{CHECKPOINT_DIR}/hub-cache"
# Rank 0 writes its TrainerResult here; the kubelet turns it into the termination message.
RESULT_FILE: Final = "/dev/termination-log"

# ---- ports --------------------------------------------------------------------------------------
# Every local rank serves Prometheus metrics on METRICS_PORT + its local rank.
METRICS_PORT: Final = 9400
# torch.distributed's rendezvous on rank 0's pod.
RENDEZVOUS_PORT: Final = 29500


# Rank 0's gauge of the step its attempt resumed from (0: a fresh start). The operator scrapes
# it into status.checkpoints and times restarts by it.
RESUMED_FROM_STEP_GAUGE: Final = "finetune_train_resumed_from_step"
# Rank 0's gauge of when (Unix seconds) its gang resumed from that step, or started afresh. A
# newer value than the operator last saw means the gang re-formed, in place or as a new attempt.
RESUMED_TIMESTAMP_GAUGE: Final = "finetune_train_resumed_timestamp_seconds"

# Rank 0's estimate of what a stop (SIGTERM) takes: ending the step it is on (the longest of
# its recent steps) and saving a checkpoint (the last save, its Hub upload included). Every rank
# exports it beside the pods' termination grace period; the operator scrapes rank 0's into the
# condition SavesOnStop, and the alert FineTuneJobStopOutlastsGracePeriod compares the two.
STOP_SECONDS_GAUGE: Final = "finetune_checkpoint_stop_seconds"
GRACE_PERIOD_GAUGE: Final = "finetune_termination_grace_period_seconds"
# A pod's terminationGracePeriodSeconds when its spec sets none (the API server's default).
KUBERNETES_GRACE_PERIOD_SECONDS: Final = 30


def metrics_port_name(local_rank: int) -> str:
    """The container port name of a local rank's metrics: `metrics`, `metrics-1`, ... (the
    chart's PodMonitor has one endpoint per name)."""
    return "metrics" if local_rank == 0 else f"metrics-{local_rank}"


# ---- environment --------------------------------------------------------------------------------
# The rendezvous: where this pod sits in the gang (torchrun's names).
NODE_RANK: Final = "NODE_RANK"
NNODES: Final = "NNODES"
NPROC_PER_NODE: Final = "NPROC_PER_NODE"
MASTER_ADDR: Final = "MASTER_ADDR"
MASTER_PORT: Final = "MASTER_PORT"
# Where the trainer keeps checkpoints, writes its result and saves the final artifact.
CHECKPOINT_DIR_ENV: Final = "FINETUNE_CHECKPOINT_DIR"
RESULT_FILE_ENV: Final = "FINETUNE_RESULT_FILE"
OUTPUT_DIR_ENV: Final = "FINETUNE_OUTPUT_DIR"
# Set when checkpoints outlive the gang on the Hub (a multi-node gang with output.hub and no
# shared volume): rank 0 mirrors each checkpoint to this branch of output.hub.repo, and restores
# from it when the checkpoint folder holds none.
CHECKPOINT_HUB_BRANCH_ENV: Final = "FINETUNE_CHECKPOINT_HUB_BRANCH"
# Base port of the metrics servers (0: any free port, for many local ranks on one host).
METRICS_PORT_ENV: Final = "FINETUNE_METRICS_PORT"
# Seconds the metrics servers stay up after training, so that a final scrape sees the end.
METRICS_LINGER_ENV: Final = "FINETUNE_METRICS_LINGER_SECONDS"
# The largest world size at which every rank exports its histograms (step and checkpoint
# times); above it only rank 0 does, unless this is raised (spec.template.env). Default 64.
HISTOGRAM_MAX_RANKS_ENV: Final = "FINETUNE_METRICS_HISTOGRAM_MAX_RANKS"
# The FineTuneJob's identity, for code and shells in the pod (the trainer reads the manifest).
JOB_NAME_ENV: Final = "FINETUNE_JOB_NAME"
JOB_NAMESPACE_ENV: Final = "FINETUNE_JOB_NAMESPACE"
# The allocator a CPU job's processes start with: tcmalloc, which the trainer image installs
# (Debian's libtcmalloc-minimal4), named by its soname so that the dynamic loader finds it for
# the node's architecture. The operator sets it for CPU pods unless template.env names
# LD_PRELOAD; `finetune train` started any other way preloads it itself where it is installed.
PRELOAD_ENV: Final = "LD_PRELOAD"
CPU_ALLOCATOR: Final = "libtcmalloc_minimal.so.4"
# The CUDA caching allocator's setting for a GPU job: expandable segments, so that memory freed by
# blocks of varying sizes (batches of varying length, evaluation between training steps) is
# reused instead of splitting the GPU into reserved pieces no new block fits, which torch's own
# out-of-memory message recommends and TorchTitan trains with. An out-of-memory failure is
# permanent (reason DeviceOutOfMemory), so fragmentation must not be what causes one. The
# operator sets it for nvidia.com/gpu pods, and local mode for its ranks, unless either name
# is set already (PYTORCH_ALLOC_CONF is torch's newer name for it; older torch reads this one).
CUDA_ALLOC_CONF_ENV: Final = "PYTORCH_CUDA_ALLOC_CONF"
CUDA_ALLOC_CONF_ENVS: Final = (CUDA_ALLOC_CONF_ENV, "PYTORCH_ALLOC_CONF")
CUDA_ALLOC_CONF: Final = "expandable_segments:True"
# Threads of each rank process's OpenMP pool (torch's intra-op threads, which size themselves to
# every core the process sees). The operator sets it to the pod's CPU (its limit, else its
# request) split over processesPerNode, at least 1, unless template.env names it: on a shared
# node a pool sized to the node's cores oversubscribes them, and an OpenMP thread that is not
# running holds the others at every barrier. Where it is unset the trainer splits the cores it
# sees over its local ranks.
THREADS_ENV: Final = "OMP_NUM_THREADS"
# Peak FLOP/s of one accelerator at the training precision; with it the trainer exports MFU.
PEAK_FLOPS_ENV: Final = "FINETUNE_PEAK_FLOPS_PER_SECOND"
# The Hub tokens. Only ever env vars: never an argument or file. HF_TOKEN, from
# output.hub.tokenSecretRef, pushes (and checkpoints to the Hub branch), and downloads a source
# with no token of its own; huggingface_hub reads it by itself, so the trainer passes each
# download its token explicitly. The read tokens, from model.tokenSecretRef and
# dataset.tokenSecretRef, download that source only.
HF_TOKEN_ENV: Final = "HF_TOKEN"
MODEL_TOKEN_ENV: Final = "FINETUNE_MODEL_TOKEN"
DATASET_TOKEN_ENV: Final = "FINETUNE_DATASET_TOKEN"
# Every variable that may hold a token: the scrubber (finetune_api.result.scrub) hides them all.
HUB_TOKEN_ENVS: Final = (HF_TOKEN_ENV, MODEL_TOKEN_ENV, DATASET_TOKEN_ENV)


def rendezvous_env(
    *,
    nnodes: int,
    nproc_per_node: int,
    master_addr: str,
    master_port: int = RENDEZVOUS_PORT,
    node_rank: int | None = None,
) -> dict[str, str]:
    """The rendezvous variables of one pod of the gang.

    `node_rank=None` leaves NODE_RANK out: in a cluster it comes from the pod's completion index
    (a downward-API fieldRef), which only the pod knows.
    """
    env = {
        NNODES: str(nnodes),
        NPROC_PER_NODE: str(nproc_per_node),
        MASTER_ADDR: master_addr,
        MASTER_PORT: str(master_port),
    }
    if node_rank is not None:
        env = {NODE_RANK: str(node_rank), **env}
    return env


def preloads_allocator(accelerator_type: str, env_names: Iterable[str]) -> bool:
    """Whether a job's processes start with CPU_ALLOCATOR preloaded: CPU jobs do, unless
    LD_PRELOAD is among `env_names` already (the user's choice of allocator, an empty one too).
    Accelerator jobs keep the C library's malloc: tcmalloc was not measured there."""
    return accelerator_type == "cpu" and PRELOAD_ENV not in set(env_names)


def cuda_allocator_env(accelerator_type: str, env_names: Iterable[str]) -> dict[str, str]:
    """CUDA_ALLOC_CONF for a GPU job whose env names neither of CUDA_ALLOC_CONF_ENVS (the user's
    choice, an empty one too); nothing for other jobs."""
    if accelerator_type != "nvidia.com/gpu" or set(CUDA_ALLOC_CONF_ENVS) & set(env_names):
        return {}
    return {CUDA_ALLOC_CONF_ENV: CUDA_ALLOC_CONF}


# ---- exit codes ---------------------------------------------------------------------------------
class ExitCode(IntEnum):
    """How a trainer pod (or one of its rank processes) exits. The Job's podFailurePolicy fails
    the gang at once on a permanent code, so no attempt is wasted, and ignores INTERRUPTED, so
    the Job controller replaces just that pod; the verdict itself is in the TrainerResult."""

    OK = 0
    RETRYABLE = 1
    INVALID_SPEC = 3
    GATE_FAILED = 4
    # A peer got SIGTERM and the gang saved a checkpoint and stopped; this pod is sound. Its ranks
    # exit with it and `finetune train` starts them again, to rejoin the gang when the Job
    # controller has replaced the peer. A pod exits with it only when it gave up rejoining.
    REJOIN = 5
    # This pod got SIGTERM (deleted, evicted, preempted, suspended) and the gang saved a
    # checkpoint first. 128 + SIGTERM: what a shell reports for a process SIGTERM ended.
    INTERRUPTED = 143


PERMANENT_EXIT_CODES: Final = (ExitCode.INVALID_SPEC, ExitCode.GATE_FAILED)
# Exit codes that do not count against the attempt: the Job controller replaces the pod, and the
# rest of the gang rejoins it in place (ExitCode.REJOIN).
REPLACED_EXIT_CODES: Final = (ExitCode.INTERRUPTED,)
# How often one pod's ranks rejoin a re-formed gang before the pod gives up (exit REJOIN, which
# fails the attempt; the operator then restarts the whole gang as a new one).
REJOIN_LIMIT: Final = 10


# ---- the serving pod (spec.serve) ---------------------------------------------------------------
# Its init container (the trainer image, `finetune serve-prepare`) downloads exactly the pushed
# revision into SERVE_ROOT/<output repo id>, merging an adapter onto its base for the
# transformers engine; the server then loads that folder (or, for vLLM and TGI, the base and the
# adapter beside it). Clients name the model by the output repo id.
SERVE_CONTAINER_NAME: Final = "server"
SERVE_PREPARE_CONTAINER_NAME: Final = "prepare"
SERVE_ROOT: Final = "/model"
SERVE_PORT: Final = 8000
SERVE_PORT_NAME: Final = "http"
# The OpenAI-compatible API's base path on every engine.
SERVE_API_PATH: Final = "/v1"
SERVE_HEALTH_PATH: Final = "/health"
