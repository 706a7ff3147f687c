"""Whether this pod can drive the accelerators its spec asked for, checked before anything loads.

A pod that reserved GPUs and sees no CUDA (a node without the driver, a device plugin that
handed out nothing, a CPU-only image) used to train on its CPU for hours at a fraction of the
speed; a TPU job reserved TPU chips and trained on the host. Now it fails at once with reason
`AcceleratorUnavailable`, a permanent verdict: the same spec on the same kind of node sees the
same hardware. TPUs are refused outright: this trainer image carries no XLA runtime (torch_xla).
"""

from __future__ import annotations

import os

from finetune_api.v1alpha1 import ResourcesSpec


class AcceleratorUnavailable(Exception):
    """The pod cannot use the accelerators its spec asked for; the message says which and why."""


def accelerator_problem(resources: ResourcesSpec, cuda_devices: int) -> str | None:
    """What keeps `resources` from running with `cuda_devices` visible CUDA devices, or None.
    Pure, so that every case is a table test."""
    accel, ranks = resources.accelerator, resources.processes_per_node
    if accel.type == "google.com/tpu":
        return (
            "resources.accelerator.type google.com/tpu: this trainer image has no XLA runtime "
            "(torch_xla), so it cannot train on TPU chips; it fails rather than train on the "
            "host CPU while the chips stay reserved. Use nvidia.com/gpu or cpu"
        )
    if accel.type != "nvidia.com/gpu":
        return None
    if cuda_devices == 0:
        return (
            f"resources.accelerator asks for {accel.count} nvidia.com/gpu per pod, but torch sees "
            "no CUDA device in this pod (no driver or device plugin on the node, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}, or a "
            "CPU-only image); it fails rather than train on the CPU"
        )
    if cuda_devices < ranks:
        return (
            f"resources.processesPerNode is {ranks}, one GPU per rank, but torch sees only "
            f"{cuda_devices} CUDA device(s) in this pod"
        )
    return None


def check_accelerator(resources: ResourcesSpec) -> None:
    """Raise AcceleratorUnavailable when this pod cannot drive what `resources` asks for."""
    cuda_devices = 0
    if resources.accelerator.type == "nvidia.com/gpu":
        import torch  # only here: a CPU or TPU spec needs no torch to be judged

        # NVML-based, so that no CUDA context is made here (launch.preload_trainer sets it too).
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem = accelerator_problem(resources, cuda_devices)
    if problem is not None:
        raise AcceleratorUnavailable(problem)
