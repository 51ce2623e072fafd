"""Memory model against reality: a training step's measured peak beside its estimate.

For each plans file, configuration and architecture (default: the committed Hippocampus and
ACDC plans, 2d and 3d_fullres, every architecture at its planned patch and batch), a child
process runs real training steps (``TrainingLoop.train_step``: forward, Dice+CE with deep
supervision, backward, gradient clipping, SGD with momentum) on random data, in the precision
training uses on that device by default (``fold.autocast_dtype``: bf16 autocast on a CPU with
native bf16 and on recent GPUs, else fp32 on the CPU and fp16 on older GPUs; ``--precision``
to choose), and reports:

* on the CPU, the resident-memory increase: VmHWM over ``CPU_STEPS`` steps minus VmRSS before the
  network was built, with the peak reset (``/proc/self/clear_refs``) after a warm-up step of a first
  copy that loads the kernels; the child sets glibc's allocator as training does
  (``autoseg.training.memory_guard``). The measured steps are steady-state ones: SGD's momentum
  buffers exist before it, as from the second step of training on. Included: weights,
  gradients, momentum, the batch, activations, recomputation, the loss; not included:
  libraries and thread pools loaded once.
* on CUDA, ``torch.cuda.max_memory_allocated`` over the step (weights included, context not).

beside ``memory_guard.step_bytes``, the memory model's estimate for that device and precision
(the CUDA estimate also holds the allocator overhead and the context). Also parameters, the
step's seconds and the forward GFLOPs per patch. A point whose estimate is above half the memory
available is not run (``does not fit``), nor one that runs past ``--timeout`` seconds.

    python scripts/bench_arch.py [--plans FILE ...] [--configuration 2d 3d_fullres] [--arch NAME ...]
                                 [--batch N] [--patch 24x24x24] [--device cpu cuda]
                                 [--precision train|fp32|bf16] [--timeout 240] [--jsonl FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CPU_STEPS = 3  # steps measured on the CPU (see ``measure``)
DEFAULT_PLANS = [os.path.join(REPO, "plans", f) for f in ("Dataset004_Hippocampus.json", "Dataset027_ACDC.json")]


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{key}:\s+(\d+)", status.read()).group(1)) / 1024


def _trim() -> None:
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_once(plan, plans, dims: int, device, amp_dtype, batch: int, steady: bool = True, steps: int = 1):
    """Build the network and optimiser as ``train_fold`` does and run ``steps`` steps of ``batch``; returns
    (loop, seconds of the last step).

    ``steady``: SGD's momentum buffers exist before the step, as they do from training's second step on
    (the first step allocates them after the backward pass, when the activations are gone)."""
    import torch

    from autoseg.networks.registry import build_network
    from autoseg.training.loop import TrainingLoop
    from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
    from autoseg.training.schedule import PolySchedule

    network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, dims, True).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    if steady:
        for parameter in network.parameters():
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    loop = TrainingLoop(network=network, model=network, loss=DeepSupervisionLoss(DiceCELoss()), train_batches=iter(()),
                        val_batches=iter(()), optimizer=optimizer, schedule=PolySchedule(1e-2, 0.9, 1, 1),
                        num_classes=plans.num_segmentation_heads, device=device, amp_dtype=amp_dtype, progress=False)
    image = torch.randn(batch, plans.num_input_channels, *plan.patch_size, device=device)
    target = torch.randint(0, plans.num_segmentation_heads, (batch, *plan.patch_size), device=device)
    network.train()
    for _ in range(steps):
        start = time.perf_counter()
        loop.train_step(image, target)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return loop, time.perf_counter() - start


def training_precision(device, precision: str):
    """The autocast dtype (None: fp32) for ``precision``: ``train`` is what ``autoseg train`` uses on ``device`` by default."""
    import torch

    from autoseg.training.fold import TrainingOptions, autocast_dtype

    if precision == "train":
        return autocast_dtype(device, TrainingOptions())
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def estimate_mb(plans_file: str, configuration: str, name: str, device_name: str, batch: int | None,
                patch: list[int] | None, precision: str = "train") -> dict:
    """The point's plan and the memory model's estimate for it (no step is run)."""
    import torch

    from autoseg.planning.plans import load_plans
    from autoseg.training.memory_guard import step_bytes

    device = torch.device(device_name)
    plans = load_plans(plans_file)
    plan = plans.architecture(configuration, name)
    plan.batch_size = batch or plan.batch_size
    plan.patch_size = patch or plan.patch_size
    amp_dtype = training_precision(device, precision)
    estimate = step_bytes(plan, plans.num_input_channels, plans.num_segmentation_heads,
                          plans.configuration(configuration).dimensions, plan.batch_size, device.type,
                          amp_dtype is not None)
    return {"plans": os.path.basename(plans_file), "configuration": configuration, "name": name,
            "device": device.type, "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
            "patch": plan.patch_size, "batch": plan.batch_size, "estimate_mb": estimate / 2**20}


def measure(plans_file: str, configuration: str, name: str, device_name: str, batch: int | None,
            patch: list[int] | None, precision: str = "train") -> dict:
    import torch

    from autoseg.planning.plans import load_plans
    from autoseg.training.memory_guard import FIXED_THRESHOLD_ARCHITECTURES, return_freed_memory_to_system

    result = estimate_mb(plans_file, configuration, name, device_name, batch, patch, precision)
    device = torch.device(device_name)
    plans = load_plans(plans_file)
    plan = plans.architecture(configuration, name)
    plan.patch_size = result["patch"]
    dims = plans.configuration(configuration).dimensions
    amp_dtype = training_precision(device, precision)
    batch = result["batch"]
    if device.type == "cpu":
        if name in FIXED_THRESHOLD_ARCHITECTURES:  # as training sets the allocator
            return_freed_memory_to_system()
        # Loads kernels and thread pools at batch 1: cheaper than a full step, same libraries.
        warm, _ = step_once(plan, plans, dims, device, amp_dtype, 1)
        del warm
        _trim()
        base = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident size
        # Several steps: glibc's heap keeps freed blocks below its mmap threshold, which the first step
        # raises; the peak settles by the third step (Hippocampus 2d U-Net, batch 32: 236 MB after one
        # step, 316-332 MB after 2 to 13).
        loop, seconds = step_once(plan, plans, dims, device, amp_dtype, batch, steps=CPU_STEPS)
        result["peak_mb"] = _status_mb("VmHWM") - base
    else:
        # Measured as the estimate counts it (device_check.py does the same): the caching allocator's
        # reserved peak plus the CUDA context and libraries, after a warm-up step with cuDNN's autotuner on,
        # as training runs (the first step loads cuDNN/cuBLAS handles and autotunes: not a step's speed).
        from autoseg.training.distributed import select_device

        device = select_device(device_name)
        warm, _ = step_once(plan, plans, dims, device, amp_dtype, batch)
        del warm
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loop, seconds = step_once(plan, plans, dims, device, amp_dtype, batch)
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)
        result["peak_mb"] = (torch.cuda.max_memory_reserved(device) + context) / 2**20
    result["seconds"] = seconds
    result["params"] = sum(p.numel() for p in loop.network.parameters())
    from autoseg.networks.flops import forward_flops
    from autoseg.networks.registry import build_network

    network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, dims, False)
    result["gflops"] = forward_flops(network, (1, plans.num_input_channels, *plan.patch_size)) / 1e9
    return result


def run_child(plans_file: str, configuration: str, name: str, device: str, batch: int | None = None,
              patch: list[int] | None = None, precision: str = "train", timeout: float | None = None) -> dict:
    """``measure`` in a fresh process, so that one measurement's peak cannot hide another's.

    Raises ``subprocess.TimeoutExpired`` past ``timeout`` seconds (the child is killed)."""
    try:
        from scripts.child_env import child_env
    except ImportError:  # run as a script: scripts/ itself is on the path
        from child_env import child_env

    spec = json.dumps([plans_file, configuration, name, device, batch, patch, precision])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], capture_output=True,
                          text=True, cwd=REPO, env=child_env(), timeout=timeout)
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plans", nargs="+", default=DEFAULT_PLANS)
    parser.add_argument("--configuration", nargs="+", default=["2d", "3d_fullres"])
    parser.add_argument("--arch", nargs="*", help="default: every architecture in the plans")
    parser.add_argument("--batch", type=int, help="instead of the planned batch")
    parser.add_argument("--patch", help="instead of the planned patch, e.g. 24x24x24")
    parser.add_argument("--device", nargs="+", help="default: cpu, and cuda where available")
    parser.add_argument("--precision", choices=["train", "fp32", "bf16", "fp16"], default="train",
                        help="train (default): what autoseg train uses on the device")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per point before it is given up")
    parser.add_argument("--jsonl", help="also append every row to this file as one JSON object")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return

    import torch

    from autoseg.planning.plans import load_plans
    from autoseg.training.memory_guard import available_bytes

    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    patch = [int(v) for v in args.patch.split("x")] if args.patch else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; steady-state training steps per row (CPU: three)")
    header = (f"{'plans':<28} {'config':<10} {'architecture':<12} {'device':<5} {'prec':<5} {'patch':<11} "
              f"{'batch':>5} {'params':>11} {'GFLOPs':>7} {'s/step':>7} {'peak MB':>8} {'model MB':>8} {'model/peak':>10}")
    print(header + "\n" + "-" * len(header))
    for plans_file in args.plans:
        plans = load_plans(plans_file)
        for configuration in args.configuration:
            if configuration not in plans.configurations:
                continue
            for name in args.arch or sorted(plans.configurations[configuration].architectures):
                for device in devices:
                    label = f"{os.path.basename(plans_file):<28} {configuration:<10} {name:<12} {device:<5}"
                    point = estimate_mb(plans_file, configuration, name, device, args.batch, patch, args.precision)
                    prefix = (f"{label} {point['precision']:<5} {'x'.join(map(str, point['patch'])):<11} "
                              f"{point['batch']:>5}")
                    available = available_bytes(torch.device(device))
                    try:
                        # Half of what is available: the machine may be shared, and the model may be short.
                        if available is not None and point["estimate_mb"] * 2**20 > available / 2:
                            raise RuntimeError(f"does not fit: estimate {point['estimate_mb']:.0f} MB, "
                                               f"{available / 2**20:.0f} MB available")
                        r = run_child(plans_file, configuration, name, device, args.batch, patch, args.precision,
                                      args.timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        reason = f"over {args.timeout:.0f} s" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
                        print(f"{prefix} {'':>11} {'':>7} {'':>7} {'':>8} {point['estimate_mb']:8.0f} {'':>10} "
                              f"not measured: {reason}", flush=True)
                        r = {**point, "skipped": reason}
                    else:
                        print(f"{prefix} {r['params']:>11,} {r['gflops']:7.1f} {r['seconds']:7.2f} {r['peak_mb']:8.0f} "
                              f"{r['estimate_mb']:8.0f} {r['estimate_mb'] / r['peak_mb']:10.2f}", flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as log:
                            log.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
