"""Devices and ``torchrun``: one process per device, rank 0 writes.

``torchrun --nproc_per_node=N -m autoseg train ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; the process group is then initialised from the environment. On CUDA it
is ``cpu:gloo,cuda:nccl``: NCCL accepts only CUDA tensors ("No backend type associated
with device type cpu"), and gloo carries whatever a collective is handed on the CPU
(object gathers, barriers), so no call site has to know the group's device. Without
those variables everything here is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from autoseg.errors import UsageError


# The backend for CUDA tensors (a test swaps in a stand-in that, like NCCL, refuses CPU tensors).
CUDA_BACKEND = "nccl"


def process_group_backend(cuda: bool) -> str:
    """The backend string of the process group: one backend per device type it will see."""
    return f"cpu:gloo,cuda:{CUDA_BACKEND}" if cuda else "gloo"


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun.

    ``device`` is the one training will ask for: with ``cpu`` the group is gloo only and no GPU is
    touched (``set_device`` would start a CUDA context, about 0.5 GB, on a GPU the run never uses)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Under torchrun (which sets TORCHELASTIC_RUN_ID) a group is made even for one process, so that
    # `torchrun --nproc_per_node=1` on a one-GPU machine runs the collectives through NCCL too.
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        cuda = torch.cuda.is_available() and str(device).partition(":")[0] in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(process_group_backend(cuda))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def select_device(name: str | torch.device) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``mps``, or (the Python API) ``cuda:N`` and a torch.device."""
    name = str(name)
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"device '{name}': expected auto, cpu, cuda (or cuda:N) or mps")
    if name == "auto":
        name = kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: {torch.cuda.device_count()} CUDA device(s) visible")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: no Apple GPU is available")
    if kind == "cuda":
        # Patches and windows keep one shape for the whole run, so cuDNN's autotuner pays its trials once
        # (nnU-Net's run_training sets the same).
        torch.backends.cudnn.benchmark = True
    if kind == "cuda" and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if index and int(index) != local_rank:  # every rank would claim the same GPU (NCCL refuses duplicates)
            raise UsageError(f"device '{name}' under torchrun: each process uses its own GPU (LOCAL_RANK "
                             f"{local_rank}); ask for 'cuda'")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` without torchrun); a collective call."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
