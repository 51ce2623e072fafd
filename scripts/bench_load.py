#!/usr/bin/env python3
"""Predicting a long folder: peak memory for 20 against 200 cases, and the cores used.

    python scripts/bench_load.py [--cases 20 200] [--tta]

Makes the synthetic dataset with as many test cases as the largest count (sizes vary from
case to case, as real scans do), plans it, and stands in for a trained model with the
planned U-Net at random weights (speed and memory do not depend on the weights). Then
`autoseg predict` runs as a child process on the first 20 and on all 200 cases; its peak RSS
comes from wait4(). The reference is the 20-case run of the same script: memory is flat when
the ratio is ~1.0 (target <= 1.05). The cost of one more case is the difference of the two
wall times over the difference of the counts (start-up cancels out).

Cores: the 20 cases again with the process pinned to one core; CPU time over wall time
says how many cores each run kept busy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Run:
    cases: int
    cores: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float

    @property
    def busy_cores(self) -> float:
        return self.cpu_s / self.wall_s


def prepare(work: Path, cases: int) -> list[str]:
    """The synthetic dataset, its plan, a random-weight model; returns the roots flags."""
    import torch

    from autoseg.cli import main
    from autoseg.dataset.synthetic import make_synthetic_dataset
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans, save_plans

    make_synthetic_dataset(work / "raw", num_cases=6, num_test=cases)
    flags = [f"--raw={work / 'raw'}", f"--preprocessed={work / 'pre'}", f"--results={work / 'res'}"]
    if main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-a", "unet", "--no-preprocess", *flags]):
        sys.exit("planning failed")
    plans = load_plans(work / "pre" / "Dataset999_Synthetic" / "plans.json")
    fold = work / "res" / "Dataset999_Synthetic" / "3d_fullres__unet" / "fold_0"
    fold.mkdir(parents=True)
    save_plans(plans, fold / "plans.json")
    torch.manual_seed(0)
    network = build_network(plans.architecture("3d_fullres"), plans.num_input_channels,
                            plans.num_segmentation_heads, 3)
    torch.save({"model": network.state_dict()}, fold / "checkpoint_final.pt")
    arch = plans.architecture("3d_fullres")
    print(f"model: planned 3d_fullres U-Net, patch {arch.patch_size}, features {arch.features}, "
          f"{arch.num_parameters / 1e6:.1f} M parameters (random weights)")
    return flags


def predict(images: Path, output: Path, flags: list[str], cases: int, cores: set[int] | None, tta: bool) -> Run:
    inputs = output.parent / f"in_{cases}"
    if not inputs.exists():
        inputs.mkdir()
        for image in sorted(images.iterdir())[:cases]:
            (inputs / image.name).symlink_to(image)
    command = [sys.executable, "-m", "autoseg", "predict", "-i", str(inputs), "-o", str(output), "-d", "999",
               "-c", "3d_fullres", "-f", "0", "--device", "cpu", *([] if tta else ["--disable-tta"]), *flags]
    env = child_env()
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"predict failed:\n{child.stderr.read().decode()[-2000:]}")
    child.stderr.close()
    written = len(list(output.glob("*.nii.gz")))
    if written != cases:
        sys.exit(f"predict wrote {written} of {cases} cases")
    used = len(cores) if cores else len(os.sched_getaffinity(0))
    return Run(cases, used, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs=2, default=[20, 200], metavar=("FEW", "MANY"))
    parser.add_argument("--tta", action="store_true", help="mirroring on (8x the compute per case)")
    args = parser.parse_args()
    few, many = sorted(args.cases)
    work = Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        flags = prepare(work, many)
        images = work / "raw" / "Dataset999_Synthetic" / "imagesTs"
        allowed = os.sched_getaffinity(0)
        runs = [predict(images, work / f"out_{n}", flags, n, None, args.tta) for n in (few, many)]
        pinned = predict(images, work / f"out_{few}_one_core", flags, few, {min(allowed)}, args.tta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'cases':>6s} {'cores':>5s} {'wall (s)':>9s} {'peak RSS (MB)':>14s} {'cores busy':>11s}")
    for run in runs + [pinned]:
        print(f"{run.cases:6d} {run.cores:5d} {run.wall_s:9.1f} {run.peak_rss_mb:14.0f} {run.busy_cores:11.2f}")
    per_case = (runs[1].wall_s - runs[0].wall_s) / (many - few)
    ratio = runs[1].peak_rss_mb / runs[0].peak_rss_mb
    print(f"one more case costs {per_case:.2f} s; peak RSS {many} / {few} cases: {ratio:.3f} (target <= 1.05: flat)")
    print(f"{few} cases on {runs[0].cores} core(s) against 1 core: speed-up {pinned.wall_s / runs[0].wall_s:.2f}, "
          f"{runs[0].busy_cores:.2f} against {pinned.busy_cores:.2f} cores busy (on a machine shared with other "
          "work, threads wait for each other: compare on an idle one)")


if __name__ == "__main__":
    main()
