"""Before training: keep the CPU allocator honest, and refuse a plan that cannot fit.

Two things the memory model (``autoseg.networks.memory``) relies on and checks:

* **Freed memory goes back to the system.** glibc's malloc raises its mmap threshold each
  time a large block is freed (up to 32 MB), after which blocks of that size come from the
  heap, whose freed holes stay resident. The selective scan allocates and frees thousands of
  16 MB blocks per step, and U-Mamba Enc's resident memory grew past 12 GB at a plan whose
  live tensors peak near 2 GB. A fixed threshold keeps every large tensor in its own mapping,
  returned on free, so resident memory follows the live tensors the model counts. Elsewhere
  glibc's default stays (a fixed threshold made a 3D U-Net step about 20 % slower) and its heap
  is counted instead: ``CPU_HEAP_OVERHEAD``.
* **A plan above the memory available is refused** with one line before anything is written,
  instead of meeting the kernel's OOM killer (which can take other people's work with it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from pathlib import Path

import torch

from autoseg.errors import PlanError
from autoseg.networks.memory import CONTEXT_BYTES
from autoseg.networks.registry import build_network
from autoseg.networks.topology import UNetTopology
from autoseg.planning.measurement_cache import network_identity, remembered_estimate
from autoseg.planning.plans import ArchitecturePlan

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 4 * 2**20
CGROUP_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number
# Only the selective scan's thousands of large temporaries need the fixed threshold; elsewhere it costs
# time (each large tensor gets fresh pages from the kernel), unmeasured for the CNNs, so they keep glibc's default.
FIXED_THRESHOLD_ARCHITECTURES = {"umamba_bot", "umamba_enc"}
# Resident memory of a CPU training step over the live tensor bytes the memory model counts, once the
# heap has settled (by the third step): freed blocks below the mmap threshold stay on the heap,
# fragmented. Measured by ``scripts/bench_arch.py`` (three steps): Hippocampus 2d at batch 4, live
# estimate / resident peak 0.63-0.87 for the CNNs, Swin UNETR and xLSTM-UNet (the U-Net's, 0.70 at batch
# 32, grows with the batch), 0.78-0.95 for the U-Mambas under the fixed threshold; ACDC 3d_fullres
# U-Net and ResEnc, whose large blocks are mapped, 0.89. Keyed by whether the threshold is fixed.
CPU_HEAP_OVERHEAD = {False: 1.3, True: 1.15}


def return_freed_memory_to_system() -> bool:
    """Fix glibc's mmap threshold at 4 MB (see the module docstring); False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.lstrip("-").isdigit() else int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_available_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Limit minus working set of this process's memory cgroup (v2 or v1); None without a limit.

    The working set leaves out inactive page cache, which the kernel reclaims before it kills."""
    for limit_file, usage_file, stat_key in (("memory.max", "memory.current", "inactive_file"),
                                             ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                              "total_inactive_file")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is None or usage is None or limit >= CGROUP_UNLIMITED:
            continue
        stat = root / Path(limit_file).parent / "memory.stat"
        return max(0, limit - (usage - _stat_value(stat, stat_key)))
    return None


def host_available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """What this process can still allocate on the host: MemAvailable, or less under a cgroup limit."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    limits = [v for v in (available, cgroup_available_bytes(cgroup_root)) if v is not None]
    return min(limits) if limits else CGROUP_UNLIMITED


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (host memory for the CPU); None where it cannot be known (MPS)."""
    if device.type == "cuda":
        # What the memory model's estimate is held against: a step's estimate counts the CUDA context
        # (CONTEXT_BYTES) and the weights, but free memory is read after both exist (the network is on
        # the device by now), so what this process holds and the context are given back to it.
        free, _total = torch.cuda.mem_get_info(device)
        return int(free) + torch.cuda.memory_reserved(device) + int(CONTEXT_BYTES)
    if device.type == "cpu":
        return host_available_bytes()
    return None


def step_bytes(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int, batch_size: int,
               device_type: str, autocast: bool) -> float:
    """The memory model's peak for one training step of ``plan`` at ``batch_size``, on the meta device."""
    divisor = UNetTopology(plan.patch_size, plan.kernel_sizes, plan.strides, plan.features).divisor()
    # The planner's probe (twice the stride product), so the estimate is the one the plan was sized with.
    identity = network_identity(plan.name, dimensions, in_channels, num_classes, plan.options, plan.strides,
                                plan.kernel_sizes, plan.features)
    estimate = remembered_estimate(lambda: build_network(plan, in_channels, num_classes, dimensions, True),
                                   in_channels, [2 * d for d in divisor], identity)
    needed = estimate.training_bytes(batch_size, math.prod(plan.patch_size), amp=autocast, device_type=device_type)
    if device_type == "cpu":
        needed *= CPU_HEAP_OVERHEAD[plan.name in FIXED_THRESHOLD_ARCHITECTURES]
    return needed


def check_training_memory(plans, plans_file: Path, configuration: str, plan: ArchitecturePlan, batch_size: int,
                          device: torch.device, amp_dtype: torch.dtype | None, ranks: int = 1) -> None:
    """Prepare the allocator and raise ``PlanError`` when one step of ``plan`` needs more than is available.

    ``ranks`` > 1: DistributedDataParallel's gradient buckets, a float32 copy of the gradients, come on top."""
    if device.type == "cpu" and plan.name in FIXED_THRESHOLD_ARCHITECTURES:
        return_freed_memory_to_system()
    available = available_bytes(device)
    if available is None:
        return
    config = plans.configuration(configuration)
    needed = step_bytes(plan, plans.num_input_channels, plans.num_segmentation_heads, config.dimensions,
                        batch_size, device.type, amp_dtype is not None)
    if ranks > 1:
        needed += 4 * plan.num_parameters
    if needed <= available:
        return
    precision = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    # The planner's budget scaled by what fits: a plan sized for it needs about what is available.
    budget = max(0.1, math.floor(10 * plans.gpu_memory_gb * available / needed) / 10)
    raise PlanError(f"{plan.name} ({configuration}, patch {'x'.join(map(str, plan.patch_size))}, batch {batch_size}) "
                    f"needs about {needed / 2**30:.1f} GB per training step on the {device.type} ({precision}) but "
                    f"{available / 2**30:.1f} GB are available; plan for a smaller budget: autoseg plan-and-preprocess "
                    f"-d {plans.dataset_name} --gpu-memory-gb {budget:g}", plans_file)
