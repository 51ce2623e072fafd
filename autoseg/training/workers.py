"""How many augmentation processes a training run starts, and whether their batches fit in shared memory.

On the CPU the workers share the cores with the training step, so a few are enough (``min(4, cores)``).
On a GPU the step is short and augmentation, done on the CPU, sets the pace: on one core of an AMD EPYC
a Hippocampus batch of 7 (40x56x40) takes 72 ms to augment, an ACDC batch of 4 (20x256x224) 256 ms and a
CT batch of 2 (128^3) 404 ms (``scripts/bench_augmentation.py``), where an H200 steps a U-Net through the
first two in 17 and 144 ms (README, device check): Hippocampus needs five workers to keep up, larger
batches and other GPUs more. So a GPU run takes nnU-Net's default, 12 workers, at most one per core
(of those this process may use, shared among torchrun's ranks on the machine);
``nnUNet_n_proc_DA``, which users of nnU-Net set for their machines, is honoured as nnU-Net honours it.

Each worker keeps ``PREFETCH`` batches ready, and a batch travels to the training process through shared
memory (``/dev/shm`` on Linux). A container's default of 64 MB holds one ACDC batch (about 55 MB), and a
worker that cannot place its batch dies of a bus error in the middle of an epoch; so the workers are cut
to what fits before they start, with a note that says how to give the container more.
"""

from __future__ import annotations

import math
import os
from shutil import disk_usage

CPU_WORKERS = 4
GPU_WORKERS = 12  # nnU-Net's get_allowed_n_proc_DA default
NNUNET_WORKERS_ENV = "nnUNet_n_proc_DA"
PREFETCH = 4  # batches each worker keeps ready (DataLoader's prefetch_factor)
SHARED_MEMORY = "/dev/shm"


def local_ranks() -> int:
    """Training processes torchrun started on this machine (1 without torchrun): each has its own workers."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def usable_cores() -> int:
    """Cores this process may run on (a cluster job's or a container's share, not the machine's), shared
    among the training processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_ranks())


def default_workers(device_type: str) -> int:
    """Augmentation processes when ``--num-workers`` is not given, for a run on ``device_type``."""
    cores = usable_cores()
    chosen = os.environ.get(NNUNET_WORKERS_ENV, "").strip()
    if chosen:
        try:
            return max(0, min(int(chosen), cores))
        except ValueError:
            pass  # not a number: nnU-Net would fail at import; the default below is the kinder reading
    return min(GPU_WORKERS if device_type in ("cuda", "mps") else CPU_WORKERS, cores)


def batch_bytes(batch_size: int, channels: int, patch_size: list[int]) -> int:
    """Bytes of one training batch as it leaves a worker: float32 images and int64 class indices."""
    return batch_size * math.prod(patch_size) * (4 * channels + 8)


def fit_shared_memory(workers: int, one_batch: int, processes: int | None = None, folder: str = SHARED_MEMORY
                      ) -> tuple[int, str | None]:
    """(workers that fit, a note or None). ``processes``: training processes on this machine sharing
    ``folder``, each with its own workers (default: torchrun's ranks here, ``local_ranks``). Half of what is free is given to the batches
    in flight (each worker's ``PREFETCH`` and the one being handed over), the rest left as headroom."""
    if workers == 0 or not os.path.isdir(folder):  # in-process, or no /dev/shm (macOS: other shared memory)
        return workers, None
    free = disk_usage(folder).free
    processes = local_ranks() if processes is None else processes
    per_worker = (PREFETCH + 1) * one_batch
    kept = int(free // 2 // processes // per_worker)
    if kept >= workers:
        return workers, None
    started = "0 start (augmentation in the training process, slower)" if kept == 0 else \
        f"{kept} start{'s' if kept == 1 else ''}"
    return kept, (f"{folder} has {free / 2**20:.0f} MB free; {workers} augmentation worker(s) would keep up to "
                  f"{workers * per_worker * processes / 2**20:.0f} MB of batches there, so {started}. "
                  "In a container, give it more (docker run --shm-size 8g, or --ipc=host) for full speed")
