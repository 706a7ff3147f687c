"""Process environment: Hub settings, thread counts, the allocator and the rendezvous a pod is
given.

Nothing here imports torch or huggingface_hub. `huggingface_hub` reads HF_ENDPOINT and friends when
it is first imported, so `configure_hub_env` must run before any Hugging Face module is imported.
"""

from __future__ import annotations

import glob
import os
import socket
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from finetune_api import FieldError, FineTuneJob, ManifestError, pod

# Test hook: each rank writes a hash of its trainable parameters to this path (see train.py).
PARAM_HASH_ENV = "FINETUNE_DEBUG_PARAM_HASH_FILE"


def configure_hub_env(job: FineTuneJob, env: MutableMapping[str, str] = os.environ) -> None:
    """Point the Hub client at the job's endpoint; an explicit HF_ENDPOINT wins."""
    hub = job.spec.output.hub
    if hub is not None and hub.endpoint and "HF_ENDPOINT" not in env:
        env["HF_ENDPOINT"] = hub.endpoint.rstrip("/")
    # Progress bars from every rank interleave into noise in pod logs.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")


# Installed for qlora alone, yet peft and transformers import it whenever it is installed, and its
# import pulls in torch's compiler stack: about 2 CPU-seconds of every pod's start, before the
# first step (pyproject's trainer extra pins it; `python -X importtime` shows the cost).
QUANTIZATION_PACKAGE = "bitsandbytes"


def hide_unused_packages(job: FineTuneJob) -> None:
    """Before the trainer is imported: mark bitsandbytes "not installed" unless the job is qlora.

    A None in sys.modules is Python's own marker for that: `importlib.util.find_spec` (which
    peft's and transformers' availability checks call) returns None, and `import` raises
    ImportError. Only this process and its forked ranks see it."""
    if job.spec.peft.method != "qlora":
        sys.modules.setdefault(QUANTIZATION_PACKAGE, None)  # type: ignore[arg-type]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def omp_threads(local_ranks: int, env: Mapping[str, str] = os.environ) -> str:
    """Threads per rank: oversubscribed cores cost ~17% on CPU, so split them unless told."""
    return env.get(pod.THREADS_ENV) or str(max(1, available_cores() // max(1, local_ranks)))


# Where allocator_env looks for pod.CPU_ALLOCATOR (tcmalloc). glibc's malloc maps every block
# above 32 MiB afresh and unmaps it when freed, so each CPU step faults its logits and
# activations in again, page by page; tcmalloc keeps them. A bare LoRA step of the CPU
# benchmark's model ran 1.10x faster with it on 2 cores (docs/benchmarks.md). PyTorch's own CPU
# launcher (torch.backends.xeon.run_cpu) preloads it the same way.
_LIBRARY_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def allocator_env(job: FineTuneJob, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What to add to the env of a process that trains `job` before it starts: LD_PRELOAD of
    tcmalloc for a CPU job where it is installed; nothing for accelerators (not measured there),
    where it is not installed, or where LD_PRELOAD is set already (by the operator in a pod; a
    template.env LD_PRELOAD, empty included, is the user's choice of allocator)."""
    if not pod.preloads_allocator(job.spec.resources.accelerator.type, env):
        return {}
    for folder in _LIBRARY_DIRS:
        found = sorted(glob.glob(os.path.join(folder, pod.CPU_ALLOCATOR)))
        if found:
            return {pod.PRELOAD_ENV: found[0]}
    return {}


def allocator_in_use() -> str:
    """The malloc this process runs on, for its log: a preloaded tcmalloc, else the C library's."""
    try:
        with open("/proc/self/maps") as maps:
            if any("libtcmalloc" in line for line in maps):
                return "tcmalloc"
    except OSError:  # not Linux
        pass
    return "the C library's malloc"


# This machine, for a store in the same pod (or, in local mode, on the same host).
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port on LOOPBACK that nothing holds now (the kernel's pick), for a server of this
    machine's own processes (local mode's rendezvous, a local model server) to bind next."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Rendezvous:
    """Where this pod sits in the gang, from the env the operator gives each pod."""

    node_rank: int
    nnodes: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_env(cls, job: FineTuneJob, env: Mapping[str, str] = os.environ) -> Rendezvous:
        def integer(name: str, default: int, minimum: int) -> int:
            raw = env.get(name)
            try:
                value = default if raw in (None, "") else int(raw)
            except ValueError:
                raise ManifestError(
                    [FieldError(name, f"must be an integer, got {raw!r}")]
                ) from None
            if value < minimum:
                raise ManifestError([FieldError(name, f"must be at least {minimum}")])
            return value

        resources = job.spec.resources
        rdzv = cls(
            node_rank=integer(pod.NODE_RANK, 0, 0),
            nnodes=integer(pod.NNODES, resources.nodes, 1),
            nproc_per_node=integer(pod.NPROC_PER_NODE, resources.processes_per_node, 1),
            master_addr=env.get(pod.MASTER_ADDR) or LOOPBACK,
            master_port=integer(pod.MASTER_PORT, pod.RENDEZVOUS_PORT, 1),
        )
        if rdzv.node_rank >= rdzv.nnodes:
            raise ManifestError(
                [FieldError(pod.NODE_RANK, f"must be below {pod.NNODES}={rdzv.nnodes}")]
            )
        return rdzv

    def rank_env(self, local_rank: int) -> dict[str, str]:
        """The torch.distributed variables of one local rank. The ranks of node 0 reach rank 0's
        store on loopback, since it is in their own pod: not through the rendezvous Service,
        whose endpoint may still be the pod this one replaced (store.py), and which a pod can
        reach only where the network lets it reach itself through a Service (hairpin)."""
        return {
            "RANK": str(self.node_rank * self.nproc_per_node + local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": LOOPBACK if self.node_rank == 0 else self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def runtime_errors(job: FineTuneJob) -> list[FieldError]:
    """What the schema cannot know: this machine's hardware and its files."""
    errors = []
    spec = job.spec
    for section, source in (("model", spec.model.source), ("dataset", spec.dataset.source)):
        if source.startswith("file://"):
            path = source.removeprefix("file://")
            if not os.path.exists(path):
                errors.append(FieldError(f"spec.{section}.source", f"{path} does not exist"))
    needs_cuda = []
    if spec.peft.method == "qlora":
        needs_cuda.append(("spec.peft.method", "qlora (bitsandbytes 4-bit) needs a CUDA GPU"))
    if spec.training.precision == "fp16":
        needs_cuda.append(("spec.training.precision", "fp16 needs a CUDA GPU"))
    if needs_cuda:
        import torch  # only here: validating a plain LoRA spec stays torch-free

        if not torch.cuda.is_available():
            errors += [FieldError(p, f"{m}, and none is visible") for p, m in needs_cuda]
    return errors


def ensure_writable_hf_home(env: MutableMapping[str, str] = os.environ) -> None:
    """evaluate copies metric modules into HF_HOME; a read-only home in a pod must not break it."""
    home = env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    try:
        os.makedirs(home, exist_ok=True)
        if os.access(home, os.W_OK):
            return
    except OSError:
        pass
    import tempfile

    env["HF_HOME"] = os.path.join(tempfile.gettempdir(), "hf-home")


# (message start, module that warns): peft's get_peft_model reads
# PreTrainedModel.is_gradient_checkpointing, which transformers 5 deprecated; sentence-transformers
# gathers embeddings across ranks with torch.distributed.nn.all_gather, which torch deprecated.
_LIBRARY_DEPRECATIONS = (
    ("`is_gradient_checkpointing` is deprecated", "transformers.modeling_utils"),
    ("torch.distributed.nn.functional.all_gather is deprecated", "sentence_transformers"),
)


def setup_logging(who: str) -> None:
    """One format for every process of a pod ("rank 0", "prefetch"), so interleaved pod and
    local-mode logs stay attributable."""
    import logging
    import warnings

    logging.basicConfig(
        format=f"%(asctime)s [{who}] %(levelname)s %(name)s: %(message)s",
        level=os.environ.get("FINETUNE_LOG_LEVEL", "INFO"),
        force=True,
    )
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Deprecations inside the libraries, one line in every pod's log that nobody running a job
    # can act on.
    for message, module in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message, FutureWarning, module)
    # basicConfig(force=True) removed every root handler: keep the tail for failure messages.
    from finetune_trainer import logtail

    logtail.install()
