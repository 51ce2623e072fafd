#!/usr/bin/env python3
"""Augmenting one training batch on one core: autoseg's pipeline against nnU-Net v2's, same patch and batch.

    python scripts/bench_augmentation.py [--batches 20] [--peers-python /tmp/peers-venv/bin/python]

What a loader worker does per batch once the patches are read: autoseg's batchgenerators ``Compose``
(``autoseg.training.data.augmentation``) on the batch drawn 1.2x larger, and nnU-Net 2.8.1's
``nnUNetTrainer.get_training_transforms`` (batchgeneratorsv2, per sample, under ``threadpool_limits(1)``
as its data loader runs them) on the batch drawn at its ``get_patch_size`` size; no deep-supervision
targets on either side (autoseg makes them in the training process). Each side runs in its own child
process pinned to one core with one torch thread, as a worker is; the same random images (float32, one
channel) and labels (0-2); the median of ``--batches`` batches after two warm-up ones; one run, both sides
back to back per case. Reading patches from disk is in neither.

The last column turns autoseg's time into the workers that keep a GPU fed, from the U-Net steps an H200
measured (README, device check of 2026-12-04: not measured in this run, hence "recorded"); this is why a
GPU run starts nnU-Net's 12 workers (``autoseg/training/workers.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
# name, patch, batch, anisotropic axis (autoseg: in-plane only across it; nnU-Net: its dummy 2D by the patch)
CASES = [("Hippocampus 3d_fullres", [40, 56, 40], 7, None),
         ("ACDC 3d_fullres", [20, 256, 224], 4, 0),
         ("CT 128^3", [128, 128, 128], 2, None)]
H200_UNET_STEP_MS = {"Hippocampus 3d_fullres": 17.0, "ACDC 3d_fullres": 144.0}  # README's device-check table


def _one_core() -> None:
    import torch

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)


def _batches(shape: list[int], count: int):
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(count):
        yield (rng.normal(size=shape).astype(np.float32), rng.integers(0, 3, size=shape).astype(np.int16))


def _timed(step, shape: list[int], count: int) -> list[float]:
    import numpy as np

    np.random.seed(0)
    times = []
    for image, seg in _batches(shape, count + 2):
        start = time.perf_counter()
        step(image, seg)
        times.append(time.perf_counter() - start)
    return times[2:]


def child_autoseg(case: int, count: int) -> dict:
    sys.path.insert(0, str(REPO))
    from autoseg.training.data import CONTEXT, augmentation

    _one_core()
    _, patch, batch, axis = CASES[case]
    drawn = [p if a == axis else int(math.ceil(p * CONTEXT)) for a, p in enumerate(patch)]
    transform = augmentation(patch, axis)

    def step(image, seg):
        out = transform(data=image, seg=seg.astype("float32"))
        assert list(out["data"].shape[2:]) == patch

    return {"drawn": drawn, "times": _timed(step, [batch, 1, *drawn], count)}


def child_nnunet(case: int, count: int) -> dict:
    import numpy as np
    import torch
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from threadpoolctl import threadpool_limits

    _one_core()
    _, patch, batch, _ = CASES[case]
    # nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size, for a 3D patch
    dummy_2d = max(patch) / patch[0] > 3
    rotation = (-np.pi, np.pi) if dummy_2d else (-np.pi / 6, np.pi / 6)
    drawn = [int(v) for v in get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))]
    if dummy_2d:
        drawn[0] = patch[0]
    transform = nnUNetTrainer.get_training_transforms(patch, rotation, None, (0, 1, 2), dummy_2d, [False], False,
                                                      [1, 2], None, None)

    def step(image, seg):
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            images, segs = torch.from_numpy(image), torch.from_numpy(seg)
            out = [transform(image=images[b], segmentation=segs[b]) for b in range(batch)]
            stacked = torch.stack([o["image"] for o in out])
            assert list(stacked.shape[2:]) == patch

    return {"drawn": drawn, "times": _timed(step, [batch, 1, *drawn], count)}


def run_child(python: str, side: str, case: int, count: int) -> dict:
    command = [python, str(Path(__file__).resolve()), "--child", side, "--case", str(case), "--batches", str(count)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_ms(times: list[float]) -> float:
    ordered = sorted(times)
    middle = len(ordered) // 2
    return 1000 * (ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--peers-python", default=os.environ.get("PEERS_VENV", "/tmp/peers-venv") + "/bin/python")
    parser.add_argument("--child", choices=["autoseg", "nnunet"], help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (child_autoseg if args.child == "autoseg" else child_nnunet)(args.case, args.batches)
        print(json.dumps(result))
        return 0
    peers = Path(args.peers_python)
    if not peers.exists():
        print(f"{peers} is missing: nnU-Net runs in the peers' environment (../shared/peers/setup.sh)", file=sys.stderr)
        return 2
    print(f"one core, one torch thread, median of {args.batches} batches after 2 warm-up ones", flush=True)
    print("| case | batch x patch | autoseg ms (drawn) | nnU-Net ms (drawn) | autoseg / nnU-Net | "
          "workers to feed an H200 U-Net step (recorded) |")
    print("|---|---|---|---|---|---|")
    for index, (name, patch, batch, _) in enumerate(CASES):
        ours = run_child(sys.executable, "autoseg", index, args.batches)
        theirs = run_child(str(peers), "nnunet", index, args.batches)
        ours_ms, theirs_ms = median_ms(ours["times"]), median_ms(theirs["times"])
        step = H200_UNET_STEP_MS.get(name)
        feed = f"{math.ceil(ours_ms / step)} (step {step:.0f} ms)" if step else "-"
        print(f"| {name} | {batch} x {'x'.join(map(str, patch))} | {ours_ms:.0f} ({'x'.join(map(str, ours['drawn']))}) "
              f"| {theirs_ms:.0f} ({'x'.join(map(str, theirs['drawn']))}) | {ours_ms / theirs_ms:.2f} | {feed} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
