#!/usr/bin/env python3
"""The U-Net's training step with nnU-Net's kernels against the kernels autoseg had before 2026-12-05.

    python scripts/bench_decoder_kernels.py [--plans plans/Dataset027_ACDC.json] [--batch 4] [--rounds 2]

Before: MONAI DynUNet's own decoder (each level convolves with the kernel of the stage below) and
a kernel of 3 that fell back to 1 at deeper stages (the topology rule per stage, not kept once
given). Now: each decoder level with its own stage's kernel, 3 kept down to the bottleneck
(``networks/unet.py``, ``networks/topology.py``). Both are built from the committed plan's
3d_fullres U-Net (random weights) and timed for one bf16 training step of ``--batch`` images, in
the calls training makes on the CPU, alternating in one process for ``--rounds`` rounds (median
of 2 steps after a warm-up each). Run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from monai.networks.nets import DynUNet  # noqa: E402

from autoseg.networks import topology, unet  # noqa: E402
from autoseg.networks.call_size import training_images_per_call  # noqa: E402
from autoseg.networks.registry import build_network  # noqa: E402
from autoseg.planning.plans import load_plans  # noqa: E402
from scripts.bench_call_size import step_loop, timed  # noqa: E402


def kernels_per_stage(spacing: list[float], strides: list[list[int]]) -> list[list[int]]:
    """The rule before 2026-12-05: each stage's kernel from its own spacing alone."""
    kernels, current = [], list(spacing)
    for stride in strides:
        current = [c * s for c, s in zip(current, stride)]
        kernels.append(topology._kernel(current))
    return kernels


def step_seconds(arch, channels: int, classes: int, batch: int, before: bool) -> tuple[float, int]:
    torch.manual_seed(0)
    with mock.patch.object(unet, "_LevelKernelDynUNet", DynUNet) if before else contextlib.nullcontext():
        network = build_network(arch, channels, classes, 3, True).train()
    loop = step_loop(network, classes, torch.bfloat16, training_images_per_call(arch.patch_size, torch.device("cpu")))
    image = torch.randn(batch, channels, *arch.patch_size)
    target = torch.randint(0, classes, (batch, *arch.patch_size))
    return timed(lambda: loop.train_step(image, target), 2), sum(p.numel() for p in network.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", default=str(REPO / "plans" / "Dataset027_ACDC.json"))
    parser.add_argument("--batch", type=int, default=4, help="nnU-Net's ACDC batch (autoseg now plans 3)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    plans = load_plans(Path(args.plans))
    config = plans.configurations["3d_fullres"]
    now = config.architectures["unet"]
    before = dataclasses.replace(now, kernel_sizes=kernels_per_stage(config.spacing, now.strides))
    print(f"{Path(args.plans).name} 3d_fullres {now.patch_size}, batch {args.batch}, bf16; kernels now "
          f"{now.kernel_sizes}, before {before.kernel_sizes}")
    for round_ in range(args.rounds):
        for label, arch, old in (("before", before, True), ("now", now, False)):
            seconds, parameters = step_seconds(arch, plans.num_input_channels, plans.num_segmentation_heads,
                                               args.batch, old)
            print(f"round {round_ + 1} {label:6s} {parameters / 1e6:6.2f} M parameters: {seconds:6.2f} s / step",
                  flush=True)


if __name__ == "__main__":
    main()
