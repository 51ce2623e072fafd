#!/usr/bin/env python3
"""autoseg plan-and-preprocess against nnUNetv2_plan_and_preprocess, same data, same run.

    python scripts/bench_preprocess.py [--dataset Dataset004_Hippocampus] [-np 2]

Prints wall time and peak memory (``/usr/bin/time -v``, children included) of both tools,
the ratios autoseg / nnU-Net (target: time <= 0.5, memory <= 1.0) and compares the
3d_fullres plans (spacing, patch, stages, batch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def timed(command: list[str], env: dict) -> tuple[float, float]:
    result = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", result.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return seconds, rss_kb / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="Dataset004_Hippocampus")
    parser.add_argument("-np", type=int, default=2)
    args = parser.parse_args()
    source = SHARED / "data" / args.dataset
    if not source.is_dir():
        sys.exit(f"skipped: {source} is missing")
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    (work / "raw").mkdir()
    (work / "raw" / args.dataset).symlink_to(source)
    env = dict(os.environ)
    ours = ["autoseg", "plan-and-preprocess", "-d", args.dataset, "-c", "3d_fullres", "-np", str(args.np),
            f"--raw={work / 'raw'}", f"--preprocessed={work / 'autoseg_pre'}", f"--results={work / 'autoseg_res'}"]
    autoseg_time, autoseg_mem = timed(ours, env)
    plans = json.loads((work / "autoseg_pre" / args.dataset / "plans.json").read_text())
    full = plans["configurations"]["3d_fullres"]
    unet = full["architectures"]["unet"]
    print(f"autoseg : {autoseg_time:6.1f} s  peak {autoseg_mem:.2f} GB   3d_fullres spacing {full['spacing']} "
          f"patch {unet['patch_size']} batch {unet['batch_size']} stages {len(unet['strides'])}")

    nnunet = SHARED / "peers" / "nnunet.sh"
    venv = Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv"))
    if not (venv / "bin" / "nnUNetv2_plan_and_preprocess").exists():
        print(f"nnU-Net: not installed at {venv} (run {SHARED / 'peers' / 'setup.sh'}); no ratio")
        return
    nn_env = dict(env, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nn_pre"),
                  nnUNet_results=str(work / "nn_res"), PATH=f"{venv / 'bin'}:{env['PATH']}")
    number = int(re.match(r"Dataset(\d+)_", args.dataset).group(1))
    nn_time, nn_mem = timed([str(venv / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(number), "-c", "3d_fullres",
                             "-np", str(args.np), "--verify_dataset_integrity"], nn_env)
    nn_plans = json.loads((work / "nn_pre" / args.dataset / "nnUNetPlans.json").read_text())
    nn_full = nn_plans["configurations"]["3d_fullres"]
    stages = nn_full.get("architecture", {}).get("arch_kwargs", {}).get("n_stages", "?")
    print(f"nnU-Net : {nn_time:6.1f} s  peak {nn_mem:.2f} GB   3d_fullres spacing {nn_full['spacing']} "
          f"patch {nn_full['patch_size']} batch {nn_full['batch_size']} stages {stages}")
    print(f"ratio autoseg/nnU-Net: time {autoseg_time / nn_time:.2f} (target <= 0.5), "
          f"peak memory {autoseg_mem / nn_mem:.2f} (target <= 1.0)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
