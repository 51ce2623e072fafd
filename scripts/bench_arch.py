"""Size, speed and memory of every registered architecture at the Hippocampus patch.

Each architecture at its planned 3d_fullres patch and topology in the committed
``plans/Dataset004_Hippocampus.json`` (U-Nets 40x56x40; Swin UNETR 64x64x64 by its
multiple-of-32 rule), 1 input channel, 3 classes, batch 2 for all. Per architecture:
parameters, forward GFLOPs per patch, forward+backward time (median of 3 after 1 warm-up)
and peak RSS increase on CPU next to the memory model's fp32 estimate of the same step
(saved activations + gradients; no allocator or CUDA-context terms); on CUDA
(bf16 autocast) also time and ``max_memory_allocated`` against the model's AMP estimate.

Each architecture runs in its own process so one's peak RSS does not hide another's. The
child sets MALLOC_MMAP_THRESHOLD_=4 MiB: otherwise glibc keeps freed multi-MB blocks in its
heap and the chunked scans (which allocate and free ~16 MB blocks) show several GB of
"peak RSS" that is allocator cache, not live tensors.

    python scripts/bench_arch.py [--arch NAME ...] [--reps 3] [--no-cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH, IN_CHANNELS, NUM_CLASSES = 2, 1, 3
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make_plan(name: str):
    """The architecture's plan in the committed Hippocampus plans (its own patch and topology), at batch 2."""
    from autoseg.planning.plans import load_plans

    plan = load_plans(os.path.join(REPO, "plans", "Dataset004_Hippocampus.json")).architecture("3d_fullres", name)
    plan.batch_size = BATCH
    return plan


def step(model, x, y, device: str) -> float:
    import torch

    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(x)
        logits = out[0] if isinstance(out, list) else out
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, device: str, reps: int) -> dict:
    import torch

    from autoseg.networks.registry import build_network

    torch.manual_seed(0)
    plan = make_plan(name)
    model = build_network(plan, IN_CHANNELS, NUM_CLASSES, 3, deep_supervision=True).to(device).train()
    x = torch.randn(BATCH, IN_CHANNELS, *plan.patch_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (BATCH, *plan.patch_size), device=device)
    from autoseg.networks.flops import forward_flops
    from autoseg.networks.memory import measure as measure_memory
    from autoseg.networks.topology import UNetTopology

    divisor = UNetTopology(plan.patch_size, plan.kernel_sizes, plan.strides, plan.features).divisor()
    estimate = measure_memory(lambda: build_network(plan, IN_CHANNELS, NUM_CLASSES, 3, True), IN_CHANNELS,
                              [2 * d for d in divisor])
    voxels = math.prod(plan.patch_size)
    result = {"name": name, "patch": plan.patch_size, "features": plan.features,
              "params": sum(p.numel() for p in model.parameters()),
              "gflops": forward_flops(build_network(plan, IN_CHANNELS, NUM_CLASSES, 3, False),
                                      (1, IN_CHANNELS, *plan.patch_size)) / 1e9,
              # the weights are in RSS before the step; it adds activations and gradients
              # (SGD momentum appears only after an optimiser step)
              "estimate_cpu_mb": (estimate.activation_bytes_per_voxel * voxels * BATCH
                                  + 4 * estimate.parameter_count) / 2**20,
              "estimate_cuda_mb": estimate.training_bytes(BATCH, voxels, amp=True) / 2**20}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(reps + 1):
        model.zero_grad(set_to_none=True)
        t = step(model, x, y, device)
        if i:  # the first is the warm-up
            times.append(t)
    result["seconds"] = statistics.median(times)
    result["rss_increase_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    if device == "cuda":
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return result


def main() -> None:
    from autoseg.networks.registry import ARCHITECTURES

    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", nargs="*", default=sorted(ARCHITECTURES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.reps)))
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2 ** 20)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {BATCH}, "
          f"planned Hippocampus patches, fwd+bwd median of {args.reps} after 1 warm-up")
    header = (f"{'architecture':<12} {'device':<6} {'patch':<10} {'params':>11} {'GFLOPs':>7} {'s/step':>7} "
              f"{'peak MB':>8} {'model MB':>8}")
    print(header + "\n" + "-" * len(header))
    for name in args.arch:
        for device in devices:
            proc = subprocess.run([sys.executable, __file__, "--reps", str(args.reps), "--child", name, device],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{name:<12} {device:<6} failed: {last}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            peak, model = ((r["cuda_peak_mb"], r["estimate_cuda_mb"]) if device == "cuda"
                           else (r["rss_increase_mb"], r["estimate_cpu_mb"]))
            patch = "x".join(map(str, r["patch"]))
            print(f"{name:<12} {device:<6} {patch:<10} {r['params']:>11,} {r['gflops']:7.1f} {r['seconds']:7.2f} "
                  f"{peak:8.0f} {model:8.0f}  (model/peak {model / peak:.2f})", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
