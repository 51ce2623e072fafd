#!/usr/bin/env python3
"""Seconds by images per network call on this CPU: the sweep behind ``autoseg/networks/call_size.py``.

    python scripts/bench_call_size.py [--plans Dataset004_Hippocampus ...] [--fp32] [--repeats 3]

For each committed plan (``plans/``) and configuration, with the planned U-Net (random weights):
- **predict**: 8 images of the patch (a 3D window's mirror flips; 16 slices for 2D) through the
  network in inference mode, by images per call;
- **train**: one training step of the planned batch (forward with deep supervision, Dice+CE
  over the joined outputs, backward), by images per call, as ``TrainingLoop.images_per_call``
  runs it.
Prints the median of ``--repeats`` timings after one warm-up, and the images per call that
autoseg chooses on the CPU (``predictor.windows_per_batch``, ``call_size.training_images_per_call``). Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from autoseg.inference.predictor import windows_per_batch  # noqa: E402
from autoseg.networks.call_size import training_images_per_call  # noqa: E402
from autoseg.networks.registry import build_network  # noqa: E402
from autoseg.planning.plans import load_plans  # noqa: E402
from autoseg.training.loop import TrainingLoop  # noqa: E402
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss  # noqa: E402
from autoseg.training.schedule import PolySchedule  # noqa: E402

CPU = torch.device("cpu")


def timed(function, repeats: int) -> float:
    function()  # warm-up: oneDNN builds its kernels for the shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_loop(network, classes: int, amp_dtype, images_per_call: int | None) -> TrainingLoop:
    """A loop whose ``train_step`` is training's step (forward in calls, deep-supervision Dice+CE, backward, SGD at lr 0)."""
    return TrainingLoop(network=network, model=network, loss=DeepSupervisionLoss(DiceCELoss()),
                        train_batches=iter(()), val_batches=iter(()),
                        optimizer=torch.optim.SGD(network.parameters(), lr=0.0),
                        schedule=PolySchedule(0.0, 0.9, 1, 1), num_classes=classes, progress=False,
                        amp_dtype=amp_dtype, images_per_call=images_per_call)


def splits(batch: int) -> list[int]:
    return sorted({batch, max(1, batch // 2), 4, 2, 1} & set(range(1, batch + 1)), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=["Dataset004_Hippocampus", "Dataset027_ACDC"])
    parser.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = None if args.fp32 else torch.bfloat16
    print(f"{'float32' if args.fp32 else 'bf16 autocast'}, {torch.get_num_threads()} threads; seconds by images per call")
    for name in args.plans:
        plans = load_plans(REPO / "plans" / f"{name}.json")
        for configuration in sorted(plans.configurations):
            arch = plans.architecture(configuration, "unet")
            dims, classes = len(arch.patch_size), plans.num_segmentation_heads
            torch.manual_seed(0)
            network = build_network(arch, plans.num_input_channels, classes, dims, True)
            label = f"{name} {configuration} {'x'.join(map(str, arch.patch_size))}"

            images = torch.randn(8 if dims == 3 else 16, plans.num_input_channels, *arch.patch_size)
            network.eval()
            row = []
            for per_call in splits(images.shape[0]):
                def predict():
                    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32,
                                                                enabled=dtype is not None):
                        for chunk in images.split(per_call):
                            network(chunk)
                row.append(f"{per_call}: {timed(predict, args.repeats):.3f}")
            chosen = windows_per_batch(arch.patch_size, CPU)
            print(f"predict {label}, {images.shape[0]} images | {' · '.join(row)} | autoseg: {chosen}", flush=True)

            batch = torch.randn(arch.batch_size, plans.num_input_channels, *arch.patch_size)
            target = torch.randint(0, classes, (arch.batch_size, *arch.patch_size))
            network.train()
            row = []
            for per_call in splits(arch.batch_size):
                loop = step_loop(network, classes, dtype, per_call)
                row.append(f"{per_call}: {timed(lambda: loop.train_step(batch, target), args.repeats):.2f}")
            chosen = training_images_per_call(arch.patch_size, CPU)
            # As the row's labels: the loop calls the network on the whole batch when a share would hold all of it.
            chosen = arch.batch_size if chosen is None else min(chosen, arch.batch_size)
            print(f"train   {label}, batch {arch.batch_size} | {' · '.join(row)} | autoseg: {chosen}", flush=True)


if __name__ == "__main__":
    main()
