#!/usr/bin/env python3
"""Does channels-last memory make prediction's network calls faster on this CPU?

    python scripts/bench_memory_format.py [--repeats 5] [--fp32]

For each committed plan's CNN U-Net (Hippocampus 3d_fullres, ACDC 3d_fullres and 2d), one
prediction call as ``predict`` makes it on the CPU (the windows per call of
``networks/call_size.py``, bf16 autocast where the CPU has native bf16, inference mode), timed
with the network and the input in PyTorch's default (contiguous) layout and in channels-last
(``channels_last_3d`` / ``channels_last``: oneDNN's preferred layout). Both sides run the same
calls after one untimed warm-up each; printed: the median seconds per call of each, their
ratio, and the largest difference of the softmax outputs (the layouts must agree).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    args = parser.parse_args()

    import torch

    from autoseg.inference.predictor import windows_per_batch
    from autoseg.networks.precision import cpu_has_native_bf16
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans

    amp = None if args.fp32 or not cpu_has_native_bf16() else torch.bfloat16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {amp or 'float32'}")
    print(f"{'plan':<28} {'call':<22} {'contiguous s':>12} {'channels-last s':>15} {'ratio':>6} {'max |diff|':>10}")
    for dataset, configuration in (("Dataset004_Hippocampus", "3d_fullres"), ("Dataset027_ACDC", "3d_fullres"),
                                   ("Dataset027_ACDC", "2d")):
        plans = load_plans(REPO / "plans" / f"{dataset}.json")
        plan = plans.architecture(configuration, "unet")
        dims = plans.configuration(configuration).dimensions
        network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, dims, False).eval()
        batch = windows_per_batch(plan.patch_size, torch.device("cpu"))
        image = torch.randn(batch, plans.num_input_channels, *plan.patch_size, generator=torch.Generator().manual_seed(0))
        layout = torch.channels_last_3d if dims == 3 else torch.channels_last
        results = {}
        for name, memory_format in (("contiguous", torch.contiguous_format), ("channels_last", layout)):
            model = network.to(memory_format=memory_format)
            x = image.contiguous(memory_format=memory_format)
            times = []
            with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                for index in range(args.repeats + 1):
                    start = time.perf_counter()
                    out = torch.softmax(model(x).float(), 1)
                    if index:  # the first call is the warm-up (oneDNN primitives for this layout)
                        times.append(time.perf_counter() - start)
            results[name] = (statistics.median(times), out)
        (a, out_a), (b, out_b) = results["contiguous"], results["channels_last"]
        call = f"{batch} x {'x'.join(map(str, plan.patch_size))}"
        print(f"{dataset[11:] + ' ' + configuration:<28} {call:<22} {a:12.3f} {b:15.3f} {b / a:6.2f} "
              f"{float((out_a - out_b).abs().max()):10.2e}", flush=True)


if __name__ == "__main__":
    main()
