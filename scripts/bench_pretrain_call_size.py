"""Swin UNETR's three-task pretraining step on the CPU: all 2B views in one network call against
the calls autoseg chooses (``call_size.training_images_per_call``), bf16 autocast, the committed
Hippocampus plans. Prints the median of ``--repeats`` steps after one warm-up, and the ratio.

    python scripts/bench_pretrain_call_size.py [--plans plans/Dataset004_Hippocampus.json] [--repeats 3]

Run it alone: it times wall clock on the whole machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from autoseg.networks.call_size import training_images_per_call  # noqa: E402
from autoseg.networks.registry import build_network  # noqa: E402
from autoseg.networks.swin_unetr import LEVEL_WIDTHS, feature_size_of  # noqa: E402
from autoseg.planning.plans import load_plans  # noqa: E402
from autoseg.pretraining.swin_ssl import (RotationContrastiveInpainting, RotationContrastiveInpaintingLoss,  # noqa: E402
                                          attach_heads, rotation_axes)
from scripts.bench_call_size import timed  # noqa: E402 - warm-up, then the median of the repeats


def step_seconds(arch, dimensions: int, views_per_call: int | None, repeats: int) -> float:
    torch.manual_seed(0)
    network = build_network(arch, 1, 1, dimensions, False)
    attach_heads(network, feature_size_of(arch) * LEVEL_WIDTHS[-1])
    axes = rotation_axes(arch.patch_size)
    model = RotationContrastiveInpainting(network, axes, views_per_call=views_per_call)
    loss = RotationContrastiveInpaintingLoss(axes)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    image = torch.randn(arch.batch_size, 1, *arch.patch_size)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(model(image), image)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()

    return timed(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", default=str(REPO / "plans" / "Dataset004_Hippocampus.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plans = load_plans(Path(args.plans))
    for configuration in ("3d_fullres", "2d"):
        arch = plans.architecture(configuration, "swin_unetr")
        dimensions = 2 if configuration == "2d" else 3
        chosen = training_images_per_call(arch.patch_size, torch.device("cpu"))
        whole = step_seconds(arch, dimensions, None, args.repeats)
        split = step_seconds(arch, dimensions, chosen, args.repeats)
        print(f"{configuration} {arch.patch_size}, {2 * arch.batch_size} views: one call {whole:.2f} s, "
              f"calls of {chosen} {split:.2f} s, ratio {whole / split:.2f}", flush=True)


if __name__ == "__main__":
    main()
