#!/usr/bin/env python3
"""Does channels-last memory make the network calls of prediction (and, with --training, training) faster on this CPU?

    python scripts/bench_memory_format.py [--repeats 5] [--fp32] [--training] [--architectures unet resenc_unet ...]

For each committed plan (Hippocampus 3d_fullres, ACDC 3d_fullres and 2d) and architecture, one
prediction call as ``predict`` makes it on the CPU (the windows per call of
``networks/call_size.py``, bf16 autocast where the CPU has native bf16, inference mode), timed
with the network and the input in PyTorch's default (contiguous) layout and wrapped in
``networks.memory_format.ChannelsLast`` (channels-last memory, oneDNN's own, with its instance
norm). Both sides run the same calls after one untimed warm-up each, alternating; printed:
the median seconds per call of each, their ratio, and the largest difference of the softmax
outputs (the layouts must agree). ``--training`` times training's step instead (training's CPU
batch and call size, deep-supervision Dice+CE, backward, SGD at learning rate 0; the difference
printed is the losses'). ``ArchitectureSpec.cpu_channels_last`` and ``train_fold`` follow the ratios.
"""

from __future__ import annotations

import argparse
import copy
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
    parser.add_argument("--architectures", nargs="+", default=["unet", "resenc_unet", "umamba_bot", "xlstm_unet",
                                                                "swin_unetr"],
                        help="planned architectures to time (U-Mamba Enc's full-resolution scan takes minutes a call)")
    parser.add_argument("--training", action="store_true",
                        help="time training's step (forward in calls, Dice+CE, backward; learning rate 0) instead")
    args = parser.parse_args()

    import torch

    from autoseg.inference.predictor import windows_per_batch
    from autoseg.networks.call_size import training_images_per_call
    from autoseg.networks.memory_format import ChannelsLast
    from autoseg.networks.precision import cpu_has_native_bf16
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.fold import training_batch_size
    from bench_call_size import CPU, step_loop

    amp = None if args.fp32 or not cpu_has_native_bf16() else torch.bfloat16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {amp or 'float32'}")
    print(f"{'plan':<40} {'call':<22} {'contiguous s':>12} {'channels-last s':>15} {'ratio':>6} {'max |diff|':>10}")
    for dataset, configuration in (("Dataset004_Hippocampus", "3d_fullres"), ("Dataset027_ACDC", "3d_fullres"),
                                   ("Dataset027_ACDC", "2d")):
        plans = load_plans(REPO / "plans" / f"{dataset}.json")
        dims = plans.configuration(configuration).dimensions
        for architecture in args.architectures:
            if architecture not in plans.configurations[configuration].architectures:
                continue
            plan = plans.architecture(configuration, architecture)
            torch.manual_seed(0)
            network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, dims, True).eval()
            wrapped = ChannelsLast(copy.deepcopy(network), dims).eval()
            generator = torch.Generator().manual_seed(0)
            if args.training:  # training's step at training's CPU batch and call size
                batch = training_batch_size(plan.batch_size, dims, CPU)
                calls = training_images_per_call(plan.patch_size, CPU)
                image = torch.randn(batch, plans.num_input_channels, *plan.patch_size, generator=generator)
                target = torch.randint(0, plans.num_segmentation_heads, (batch, *plan.patch_size), generator=generator)
                loops = {"contiguous": step_loop(network.train(), plans.num_segmentation_heads, amp, calls),
                         "channels_last": step_loop(wrapped.network.train(), plans.num_segmentation_heads, amp, calls)}
                loops["channels_last"].model = wrapped
                run = {name: (lambda loop=loop: loop.train_step(image, target)) for name, loop in loops.items()}
            else:  # one prediction call as predict makes it
                batch = windows_per_batch(plan.patch_size, CPU)
                image = torch.randn(batch, plans.num_input_channels, *plan.patch_size, generator=generator)
                run = {name: (lambda model=model: _predict(model, image, amp))
                       for name, model in (("contiguous", network), ("channels_last", wrapped))}
            times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
            outputs = {}
            for index in range(args.repeats + 1):
                for name in ("contiguous", "channels_last"):
                    start = time.perf_counter()
                    outputs[name] = run[name]()
                    if index:  # the first call of each is the warm-up (oneDNN primitives for the layout)
                        times[name].append(time.perf_counter() - start)
            a, b = statistics.median(times["contiguous"]), statistics.median(times["channels_last"])
            # Prediction: the largest softmax difference; training: the loss difference (learning rate 0).
            difference = abs(torch.as_tensor(outputs["contiguous"]) - torch.as_tensor(outputs["channels_last"])).max()
            call = f"{batch} x {'x'.join(map(str, plan.patch_size))}"
            print(f"{dataset[11:] + ' ' + configuration + ' ' + architecture:<40} {call:<22} {a:12.3f} {b:15.3f} "
                  f"{b / a:6.2f} {float(difference):10.2e}", flush=True)


def _predict(model, image, amp):
    import torch

    with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        return torch.softmax(model(image).float(), 1)


if __name__ == "__main__":
    main()
