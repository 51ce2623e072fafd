#!/usr/bin/env python3
"""Memory and time of `autoseg predict` on a large CT (512x512x400) on the CPU.

    python scripts/bench_large_ct.py [--shape 400 512 512] [--classes 14] [--step 0.5] [--tta]
    python scripts/bench_large_ct.py --buffers-only      # accumulation alone, against MONAI's

Full run: a plan for an abdominal-CT-like dataset (20 cases of ~400x512x512 at ~1x0.75x0.75 mm,
14 classes; the planner's own 3d_fullres U-Net: patch 128x160x128, 6 stages 32-320), an
untrained network of that topology (speed and memory do not depend on the weights), and
one synthetic CT at 1x0.7x0.7 mm, so that it is resampled on the way in and out as a real
case is. `autoseg predict` runs as a separate process under /usr/bin/time; its peak RSS
and wall time are printed (target: peak within 24 GiB). Peak memory does not depend on the
number of windows (the buffers are sized by the image, the network by one batch of
windows), so `--step 1` without `--tta` (the default here) measures the same peak in a
fraction of the time; the time at step 0.5, with and without mirroring, is then
extrapolated from the run's own seconds per window pass (the whole run's wall time over its
window passes, so an upper bound), and printed as such.

`--buffers-only`: the sliding-window accumulation alone, autoseg's against MONAI's
`sliding_window_inference` (what autoseg used before), with a 1x1x1 convolution as the
network, each in its own process; prints both peaks and their ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET = "Dataset998_LargeCT"
CASE_SPACING_ZYX = (1.0, 0.7, 0.7)


def large_ct_plans(classes: int):
    """The planner's plan for a dataset of large abdominal CTs (fingerprint written, not measured)."""
    from autoseg.fingerprint import CaseFingerprint, ClassStats, DatasetFingerprint, IntensityStats
    from autoseg.planning.planner import plan_dataset

    hu = IntensityStats(80.0, 160.0, -1024.0, 3000.0, 60.0, -120.0, 420.0, 10_000)
    cases = []
    for i in range(20):
        spacing = [1.0 + 0.0625 * (i % 5), 0.70 + 0.02 * (i % 9), 0.70 + 0.02 * (i % 9)]
        shape = [380 + 5 * i, 512, 512]
        cases.append(CaseFingerprint(f"ct_{i:03d}", spacing, shape, shape, [[0, s] for s in shape], [hu],
                                     {str(v): ClassStats(5000, 1, [5000]) for v in range(1, classes)}))
    fingerprint = DatasetFingerprint(
        1, DATASET, ["CT"], list(range(classes)), False, cases, [hu],
        [float(v) for v in np.median([c.spacing for c in cases], 0)],
        [int(v) for v in np.median([c.shape_after_crop for c in cases], 0)], 1.0, 1.5)
    labels = {"background": 0, **{f"organ_{v}": v for v in range(1, classes)}}
    return plan_dataset(fingerprint, labels, architectures=["unet"])


def synthetic_ct(shape: tuple[int, int, int]) -> np.ndarray:
    """int16 HU: air around an elliptic body of soft tissue with a few brighter organs and noise."""
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000, dtype=np.int16)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (0.42 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.47 * shape[2])) ** 2 <= 1
    image[:, body[0]] = 40
    for k in range(6):
        centre = rng.uniform(0.3, 0.7, 3) * shape
        radius = rng.uniform(0.05, 0.1) * shape[1]
        organ = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius**2
        image[organ] = 60 + 30 * k
    image += rng.normal(0, 15, shape[1:]).astype(np.int16)[None]  # cheap noise, the same on each slice
    return image


def timed_peak(command: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GiB and output of ``command`` under /usr/bin/time -v."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return wall, peak_kb / 2**20, result.stdout


def full_run(args) -> None:
    import torch

    from autoseg.inference.sliding_window import window_starts
    from autoseg.io.images import Geometry, read_header, write_image
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import save_plans
    from autoseg.planning.spacing import resampled_shape

    work = Path(tempfile.mkdtemp(prefix="bench_large_ct_"))
    plans = large_ct_plans(args.classes)
    config = plans.configuration("3d_fullres")
    arch = plans.architecture("3d_fullres", "unet")
    fold = work / "results" / DATASET / "3d_fullres__unet" / "fold_0"
    fold.mkdir(parents=True)
    save_plans(plans, fold / "plans.json")
    torch.manual_seed(0)
    network = build_network(arch, 1, plans.num_segmentation_heads, 3, deep_supervision=True).eval()
    torch.save({"model": network.state_dict()}, fold / "checkpoint_final.pt")

    shape = tuple(args.shape)
    geometry = Geometry(list(shape), list(CASE_SPACING_ZYX[::-1]), [-250.0, -220.0, -900.0],
                        [1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0])
    (work / "in").mkdir()
    write_image(synthetic_ct(shape), work / "in" / "ct_0000.nii", geometry)  # .nii: gzip of 200 MB is slow
    resampled = resampled_shape(list(shape), list(CASE_SPACING_ZYX), config.spacing)
    windows = math.prod(len(window_starts(s, p, args.step)) for s, p in zip(resampled, arch.patch_size))
    windows_half = math.prod(len(window_starts(s, p, 0.5)) for s, p in zip(resampled, arch.patch_size))
    print(f"plan: spacing {config.spacing}, patch {arch.patch_size}, features {arch.features}, "
          f"{args.classes} classes; image {list(shape)} at {list(CASE_SPACING_ZYX)} mm -> {resampled}: "
          f"{windows} windows at step {args.step} ({windows_half} at 0.5)", flush=True)
    del network

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "autoseg", "predict", "-i", str(work / "in"), "-o", str(work / "out"),
               "-d", DATASET, "-c", "3d_fullres", "-a", "unet", "-f", "0", "--device", "cpu", "--step", str(args.step),
               f"--raw={work / 'raw'}", f"--preprocessed={work / 'pre'}", f"--results={work / 'results'}"]
    if not args.tta:
        command.append("--disable-tta")
    wall, peak, _ = timed_peak(command, env)
    written, _ = read_header(work / "out" / "ct.nii")
    assert written.shape == list(shape) and not written.matches(geometry), "output geometry differs from the input"
    flips = 8 if args.tta else 1
    print(f"autoseg predict ({args.threads} threads, step {args.step}, TTA {'on' if args.tta else 'off'}): "
          f"{wall:.0f} s, peak RSS {peak:.2f} GiB (target <= 24 GiB); output geometry equals the input's")
    per_pass = wall / (windows * flips)
    print(f"{windows * flips} window passes: {per_pass:.1f} s each, reading and writing included; extrapolated "
          f"at step 0.5: {windows_half * per_pass / 60:.0f} min without TTA, {8 * windows_half * per_pass / 60:.0f} min "
          "with TTA (same peak memory)")
    shutil.rmtree(work)


BUFFERS = """
import sys, torch
torch.set_num_threads({threads})
classes, shape, patch = {classes}, {shape}, {patch}
network = torch.nn.Conv3d(1, classes, 1)
image = torch.randn(1, *shape)
with torch.inference_mode():
    if sys.argv[1] == "autoseg":
        from autoseg.inference.sliding_window import predict_probabilities
        out = predict_probabilities([network], image, patch, 0.5, False, 1)
    else:
        from monai.inferers import sliding_window_inference
        from autoseg.inference.sliding_window import EnsembleWindowFunction
        out = sliding_window_inference(image[None], patch, 1, EnsembleWindowFunction([network], [], None),
                                       overlap=0.5, mode="gaussian", sigma_scale=0.125)[0]
print(tuple(out.shape), out.dtype)
"""


def buffers_only(args) -> None:
    plans = large_ct_plans(args.classes)
    config = plans.configuration("3d_fullres")
    from autoseg.planning.spacing import resampled_shape

    shape = resampled_shape(list(args.shape), list(CASE_SPACING_ZYX), config.spacing)
    patch = plans.architecture("3d_fullres", "unet").patch_size
    script = BUFFERS.format(threads=args.threads, classes=args.classes, shape=shape, patch=patch)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    print(f"sliding-window accumulation of {args.classes} classes over {shape} voxels, patch {patch}, step 0.5")
    peaks = {}
    for tool in ("autoseg", "monai"):
        wall, peaks[tool], out = timed_peak([sys.executable, "-c", script, tool], env)
        print(f"{tool:8s} {wall:6.1f} s  peak RSS {peaks[tool]:.2f} GiB  -> {out.strip()}", flush=True)
    print(f"ratio autoseg / MONAI peak memory: {peaks['autoseg'] / peaks['monai']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[400, 512, 512], help="Z Y X of the CT")
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--step", type=float, default=1.0, help="window step (default 1: same peak, fewer windows)")
    parser.add_argument("--tta", action="store_true", help="mirroring on (8x the windows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--buffers-only", action="store_true", help="accumulation alone, autoseg against MONAI")
    args = parser.parse_args()
    buffers_only(args) if args.buffers_only else full_run(args)


if __name__ == "__main__":
    main()
