#!/usr/bin/env python3
"""autoseg's HD95 and NSD against MONAI's, on Hippocampus and synthetic anisotropic cases.

    python scripts/bench_metrics.py [--cases 40]

The "prediction" is the reference shifted by one voxel along x with class 2 eroded once,
so that every metric is non-trivial. Prints the largest difference of HD95 and NSD over
all cases and classes (target <= 1e-3 mm) and the wall time of both, single process,
with the ratio autoseg / MONAI (target <= 0.5).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.evaluation.metrics import pair_metrics  # noqa: E402
from autoseg.io.images import read_label  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def perturb(label: np.ndarray) -> np.ndarray:
    moved = np.roll(label, 1, axis=-1)
    eroded = ndimage.binary_erosion(moved == 2)
    moved[(moved == 2) & ~eroded] = 0
    return moved


def synthetic_cases(count: int):
    rng = np.random.default_rng(0)
    for _ in range(count):
        field = ndimage.gaussian_filter(rng.random((24, 96, 96)), 4)
        label = np.digitize(field, np.quantile(field, [0.8, 0.93])).astype(np.int16)
        yield label, [3.0, 0.8, 0.8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = REPO.parent / "shared" / "data" / "Dataset004_Hippocampus" / "labelsTr"
    cases = []
    if data.is_dir():
        for path in sorted(data.glob("*.nii.gz"))[: args.cases]:
            label, geometry = read_label(path)
            cases.append((label, geometry.array_spacing))
    else:
        print(f"Hippocampus missing at {data}; synthetic cases only")
    cases += list(synthetic_cases(10))
    pairs = [(label, perturb(label), spacing) for label, spacing in cases]

    start = time.perf_counter()
    ours = [[pair_metrics(ref == c, pred == c, spacing, 1.0) for c in (1, 2)] for ref, pred, spacing in pairs]
    ours_time = time.perf_counter() - start

    start = time.perf_counter()
    theirs = []
    for ref, pred, spacing in pairs:
        one_hot = lambda a: torch.from_numpy(np.stack([a == k for k in range(3)]))[None].float()  # noqa: E731
        r, p = one_hot(ref), one_hot(pred)
        dice = compute_dice(p, r, include_background=False)
        hd = compute_hausdorff_distance(p, r, include_background=False, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(p, r, class_thresholds=[1.0, 1.0], include_background=False, spacing=spacing)
        theirs.append((dice[0].numpy(), hd[0].numpy(), nsd[0].numpy()))
    monai_time = time.perf_counter() - start

    hd_diff = max(abs(o[c].hd95 - t[1][c]) for o, t in zip(ours, theirs) for c in range(2))
    nsd_diff = max(abs(o[c].nsd - t[2][c]) for o, t in zip(ours, theirs) for c in range(2))
    dice_diff = max(abs(o[c].dice - t[0][c]) for o, t in zip(ours, theirs) for c in range(2))
    print(f"{len(pairs)} cases x 2 classes: max |diff| HD95 {hd_diff:.2e} mm, NSD {nsd_diff:.2e}, Dice {dice_diff:.2e}")
    print(f"autoseg {ours_time:.2f} s, MONAI {monai_time:.2f} s, ratio autoseg/MONAI {ours_time / monai_time:.2f} "
          "(target <= 0.5)")


if __name__ == "__main__":
    main()
