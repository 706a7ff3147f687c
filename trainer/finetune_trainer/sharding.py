"""training.strategy fsdp: the model's weights, gradients and optimizer state sharded over the
ranks with torch's FSDP2 (`fully_shard`), one shard unit per transformer layer plus the root.

Why torch's `fully_shard` and not accelerate's FullyShardedDataParallelPlugin: accelerate 1.15
applies its FSDP plugin only on GPU-like backends; on CPU (`MULTI_CPU`, gloo) it drops the plugin
without a word and wraps the model in DDP, so a CPU gang could never test the path a GPU gang
runs. `fully_shard` is what accelerate's FSDP2 path calls itself (`fsdp2_prepare_model`:
transformer layers from `_no_split_modules`, then the root, with a MixedPrecisionPolicy), and it
runs on gloo as on NCCL. The sharded model is not passed to `accelerator.prepare` (which would
wrap it in DDP); the optimizer and loaders still are.

Only rank 0 reads the base's weights (loading_device): the other ranks build it on the meta
device, and `shard` gives them their shards of rank 0's, so that a pod holds the base at most
once in host memory rather than once per rank.

Checkpoints keep the store's contract (only rank 0 writes and reads it, checkpoint.py): every
rank takes part in gathering the full trainable weights and optimizer state to rank 0's host
memory, rank 0 writes them in the same format as a DDP run, and on resume every rank loads the
full state it received by broadcast, keeping its own shard. A sharded (per-rank) checkpoint
would need a store that every pod of the gang can reach, which a multi-node gang does not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from finetune_api import FieldError, ManifestError
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.fetch import reads_base_weights
from finetune_trainer.modeling import transformer_layers

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
META = torch.device("meta")


def uses_fsdp(spec: FineTuneJobSpec) -> bool:
    return spec.training.strategy == "fsdp"


def loading_device(spec: FineTuneJobSpec, rank: int, device: torch.device) -> torch.device:
    """Where rank `rank`, computing on `device`, loads the base. Under fsdp only rank 0 reads
    its weights (into host memory, as every rank does otherwise); the others build it empty on
    the meta device, and `shard` gives them their shards of rank 0's. A pod of N ranks then
    holds the base at most once in host memory, not N times, as accelerate's
    cpu_ram_efficient_loading and TorchTitan load a sharded model; and a pod without rank 0
    need not hold the weights at all (fetch.reads_base_weights)."""
    return device if reads_base_weights(spec, rank_0=rank == 0) else META


def shard(model: torch.nn.Module, mixed_precision: str, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place over every rank of the default process group (the Accelerator
    made it), each shard moved onto this rank's `device`. The model arrives whole in rank 0's
    host memory (from_pretrained loads to the CPU) and empty on the others (loading_device), so
    no device ever holds more than its shards. With bf16 mixed precision the shards keep their
    loaded dtype (fp32 master weights for what trains) and each layer computes in bf16,
    reducing gradients in fp32."""
    layers = transformer_layers(model)
    if not layers:
        # The same model fails the same way every attempt: an invalid spec, not a retry.
        message = (
            f"fsdp needs the transformer layer classes to shard by, and {type(model).__name__} "
            "names none (transformers' _no_split_modules); use strategy ddp"
        )
        raise ManifestError([FieldError("spec.training.strategy", message)])
    if not dist.is_initialized():
        # A one-rank gang: accelerate forms no process group, and a mesh needs one.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if mixed_precision in _HALF:
        policy = MixedPrecisionPolicy(
            param_dtype=_HALF[mixed_precision], reduce_dtype=torch.float32
        )
    # Rank 0's whole weights, as loaded: what every rank's shards are cut from (_fill).
    whole = model.state_dict() if dist.get_rank() == 0 else {}
    if dist.get_world_size() > 1:
        _match_dtypes(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if dist.get_world_size() > 1:
        _fill(model, whole, device)
    return model


def _match_dtypes(model: torch.nn.Module) -> None:
    """Every rank's parameters in rank 0's dtypes; a collective. Rank 0 loaded the base with
    `from_pretrained`, which keeps some models' modules in fp32 under bf16 (transformers'
    `_keep_in_fp32_modules_strict`: Mistral 4's, Nemotron-H's, ERNIE 4.5 MoE's), and the others
    built it from its config, which does not; the shards of one parameter must agree. The
    others' parameters are empty (meta), so the cast costs nothing."""
    box = [{n: p.dtype for n, p in model.named_parameters()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    dtypes: dict[str, torch.dtype] = box[0]  # type: ignore[assignment]
    for name, param in model.named_parameters():
        if param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def _fill(model: torch.nn.Module, whole: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give every rank its shards of rank 0's `whole` weights: the other ranks built the model
    empty (loading_device), and their shards are allocated here, on `device`. A collective.
    The buffers follow from rank 0 too, since a state dict leaves out the non-persistent ones
    (a Llama's rotary `inv_freq`), which an empty model holds as uninitialised memory."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def whole_root(model: torch.nn.Module, token: torch.Tensor) -> Iterator[None]:
    """The root unit's weights (embeddings, final norm, head) gathered for the block, when
    `model` is sharded; a collective. `generate` calls the inner model's forward (a PeftModel's
    base model's), which passes by the root's hooks, so they would stay shards, and a layer
    that ran forward before the root would take itself for the root (FSDP2 makes the first unit
    to run forward the root) and fail the next forward through the real one. So `token`, the
    input ids of one token (shape 1 x 1), goes through the root first: its forward gathers the
    root's weights and, waiting for a backward, keeps them; the layers gather their own as the
    inner model calls them."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model(input_ids=token)
    try:
        yield
    finally:
        reshard(model)


def reshard(model: torch.nn.Module) -> None:
    """Free the whole weights a forward without backward (evaluation) left gathered: the root
    unit keeps its weights whole after its forward, waiting for a backward that never comes, so
    its parameters read as plain tensors instead of shards until something reshards them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full trainable weights (or every weight) and optimizer state on rank 0's CPU, keyed by
    parameter name; empty on the other ranks. Every rank must call it: it is a collective."""
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    weights = get_model_state_dict(model, options=options)
    return weights, get_optimizer_state_dict(model, _bare(optimizer), options=_GATHER)


def _bare(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer, which torch's state-dict
    helpers need (they read its param_groups and state by the parameters' identity)."""
    return getattr(optimizer, "optimizer", optimizer)


def gather_weights(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full weights on rank 0's CPU (empty elsewhere); a collective, as `gather_state`."""
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    return get_model_state_dict(model, options=options)


def load_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load the full state `gather_state` saved (every rank holds all of it): each rank keeps
    its own shard. A collective."""
    set_state_dict(
        model,
        _bare(optimizer),
        model_state_dict=weights,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def fill_plain(
    plain: torch.nn.Module, weights: dict[str, torch.Tensor], sharded: torch.nn.Module
) -> None:
    """Make `plain`, a model built empty (on the meta device), the whole of what `weights`
    holds: every weight of `sharded`, gathered (gather_weights, everything). The gathered
    tensors become its parameters as they are, so the model is not copied again; its buffers,
    which no state dict holds whole (a Llama's rotary `inv_freq`), are `sharded`'s."""
    plain.load_state_dict(weights, strict=True, assign=True)
    for name, buffer in sharded.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        setattr(plain.get_submodule(module_name), buffer_name, buffer.detach().cpu().clone())
    # A head tied to the embedding is one tensor; the gathered state holds it under both names.
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    if empty := [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]:
        raise RuntimeError(f"the gathered weights left {empty[:5]} unset")


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), or the tensor itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value
