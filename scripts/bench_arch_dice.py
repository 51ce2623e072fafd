#!/usr/bin/env python3
"""Every architecture trained for the same wall-clock budget on Hippocampus, fold 0: validation Dice.

    python scripts/bench_arch_dice.py [--minutes 6] [--arch unet swin_unetr ...] [--work DIR] [--fp32]
                                      [--gpu-memory-gb GB] [--configuration 2d]

For each architecture the plan holds (3d_fullres unless ``--configuration``, its own planned
patch and batch), runs ``autoseg train 4 CONFIGURATION 0 -a ARCH --time-budget MINUTES --iters-per-epoch 25 --val-iters 5 --seed 0``
(the schedule fits the budget after a few iterations), then the end-of-fold validation
predicts the 40 validation cases with the full sliding window + mirroring and evaluates them.
Prints, per architecture: parameters, patch, batch, iterations done, seconds per iteration,
and the mean validation Dice per class. The work folder is kept, so a rerun skips
architectures already trained (delete it to start over).

``--gpu-memory-gb`` plans for a smaller device than the default: on a CPU the planned batches
(7 for the U-Net at 8 GB) leave too few iterations in a short budget to learn anything; even
at batch 5 a 3D U-Net step takes ~6 s on 2 cores (75 steps in 10 minutes: Dice 0). The 2d
configuration with a small budget (``--configuration 2d --gpu-memory-gb 1``) is what a CPU
can compare in minutes.

The budget counts training only (validation is after it). On a shared or loaded machine the
same wall-clock budget buys different amounts of compute: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NAME = "Dataset004_Hippocampus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--arch", nargs="*", default=None, help="default: every architecture in the plan")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoseg_bench_arch_dice"))
    parser.add_argument("--fp32", action="store_true", help="train in float32 (default: bf16 where the CPU has it)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="plan for this memory budget")
    parser.add_argument("--configuration", default="3d_fullres", choices=["2d", "3d_fullres"])
    args = parser.parse_args()
    source = SHARED / "data" / NAME
    if not source.is_dir():
        sys.exit(f"skipped: {source} is missing")
    raw, pre, res = args.work / "raw", args.work / "pre", args.work / "res"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / NAME).exists():
        (raw / NAME).symlink_to(source)
    env = child_env(AUTOSEG_RAW=str(raw), AUTOSEG_PREPROCESSED=str(pre), AUTOSEG_RESULTS=str(res),
                    PYTHONUNBUFFERED="1")
    autoseg = [sys.executable, "-m", "autoseg"]
    if not (pre / NAME / "plans.json").exists():
        budget = ["--gpu-memory-gb", str(args.gpu_memory_gb)] if args.gpu_memory_gb else []
        subprocess.run(autoseg + ["plan-and-preprocess", "-d", NAME, "-c", args.configuration, "-np", "2"] + budget, env=env,
                       check=True, capture_output=True)
    plans = json.loads((pre / NAME / "plans.json").read_text())
    planned = plans["configurations"][args.configuration]["architectures"]
    rows = []
    for arch in args.arch or sorted(planned):
        fold_dir = res / NAME / f"{args.configuration}__{arch}" / "fold_0"
        summary_file = fold_dir / "validation" / "summary.json"
        if not summary_file.exists():
            start = time.perf_counter()
            command = autoseg + ["train", NAME, args.configuration, "0", "-a", arch, "--time-budget", str(args.minutes),
                                 "--iters-per-epoch", "25", "--val-iters", "5", "--seed", "0"] + (["--fp32"] if args.fp32 else [])
            fold_dir.mkdir(parents=True, exist_ok=True)
            with open(fold_dir.parent / "bench_stdout.txt", "w") as log:
                code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"{arch}: exit {code} after {time.perf_counter() - start:.0f} s (log {fold_dir.parent}/bench_stdout.txt)",
                  flush=True)
            if code:
                continue
        summary = json.loads(summary_file.read_text())
        log = [json.loads(line) for line in (fold_dir / "training_log.jsonl").read_text().splitlines()]
        iterations = sum(entry.get("iterations", 25) for entry in log)
        train_seconds = sum(entry["epoch_seconds"] for entry in log)
        dice = {name: values["mean"]["dice"] for name, values in summary["per_class"].items()}
        rows.append((arch, planned[arch], iterations, train_seconds, dice, summary["mean_foreground"]["dice"]))
    print(f"\nHippocampus {args.configuration} fold 0, {args.minutes:g} min training budget each, "
          f"{'fp32' if args.fp32 else 'default precision'} on {os.cpu_count()} CPU cores, planned for {plans['gpu_memory_gb']} GB")
    header = f"{'architecture':<12} {'params':>11} {'patch':<10} {'batch':>5} {'iters':>6} {'s/iter':>7}  Dice per class  mean"
    print(header + "\n" + "-" * len(header))
    for arch, plan, iterations, seconds, dice, mean in rows:
        per_class = " ".join(f"{v:.3f}" for v in dice.values())
        print(f"{arch:<12} {plan['num_parameters']:>11,} {'x'.join(map(str, plan['patch_size'])):<10} "
              f"{plan['batch_size']:>5} {iterations:>6} {seconds / max(iterations, 1):7.2f}  {per_class}  {mean:.3f}")


if __name__ == "__main__":
    main()
