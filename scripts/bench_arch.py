"""Size, speed and memory of every registered architecture at the Hippocampus patch.

Patch 40x56x40 (Swin UNETR: rounded up by its own rule to 64x64x64), 1 input channel,
3 classes, batch 2, features from ``unet_topology([40, 56, 40], [1, 1, 1])``. Per
architecture: parameters, forward+backward time (median of 3 after 1 warm-up) and peak
RSS increase on CPU; on CUDA (bf16 autocast) also time and ``max_memory_allocated``.

Each architecture runs in its own process so one's peak RSS does not hide another's. The
child sets MALLOC_MMAP_THRESHOLD_=4 MiB: otherwise glibc keeps freed multi-MB blocks in its
heap and the chunked scans (which allocate and free ~16 MB blocks) show several GB of
"peak RSS" that is allocator cache, not live tensors.

    python scripts/bench_arch.py [--arch NAME ...] [--reps 3] [--no-cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATCH, SPACING, BATCH, IN_CHANNELS, NUM_CLASSES = [40, 56, 40], [1.0, 1.0, 1.0], 2, 1, 3


def make_plan(name: str):
    from autoseg.networks.registry import ARCHITECTURES
    from autoseg.networks.topology import unet_topology
    from autoseg.planning.plans import ArchitecturePlan

    spec = ARCHITECTURES[name]
    topo = spec.topology(PATCH, SPACING)
    if spec.topology is not unet_topology:  # its own patch rule (swin); features as it describes them
        return ArchitecturePlan(name, topo.patch_size, BATCH, topo.kernel_sizes, topo.strides, topo.features,
                                dict(spec.default_options))
    topo = unet_topology(PATCH, SPACING)
    return ArchitecturePlan(name, topo.patch_size, BATCH, topo.kernel_sizes, topo.strides, topo.features,
                            dict(spec.default_options))


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
    result = {"name": name, "patch": plan.patch_size, "features": plan.features,
              "params": sum(p.numel() for p in model.parameters())}
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
          f"patch {PATCH} (swin rounded), fwd+bwd median of {args.reps} after 1 warm-up")
    header = f"{'architecture':<12} {'device':<6} {'patch':<14} {'params':>11} {'s/step':>8} {'RSS+ MB':>8} {'CUDA MB':>8}"
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
            cuda = f"{r['cuda_peak_mb']:8.0f}" if "cuda_peak_mb" in r else f"{'-':>8}"
            patch = "x".join(map(str, r["patch"]))
            print(f"{name:<12} {device:<6} {patch:<14} {r['params']:>11,} {r['seconds']:8.2f} "
                  f"{r['rss_increase_mb']:8.0f} {cuda}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
