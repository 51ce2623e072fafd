"""Does glibc's huge-page tunable (``autoseg.allocator``) make CPU training steps faster, and at what memory?

    python scripts/bench_huge_pages.py [--repeats 2] [--steps 4] [--plans Dataset004_Hippocampus Dataset027_ACDC]

For each committed plan's 3d_fullres U-Net at training's CPU batch (Hippocampus: the plan's 7, as
``bench_train.py`` runs it; ACDC: 2), a child process runs training's CPU step (``bench_call_size.step_loop``:
the batch in training's calls of images, channels-last where ``train_fold`` uses it, bf16 autocast
where the CPU has native bf16 units, SGD at learning rate 0), two warm-up steps and times ``--steps``
more on fixed random batches; the same child runs with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (what
the ``autoseg`` command sets) and without it,
alternating, ``--repeats`` times. Printed per plan: the median seconds per step of each side, the
process's peak resident memory (ru_maxrss, so imports included on both sides) and the time ratio
with / without. Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from child_env import child_env  # noqa: E402

BATCH = {"Dataset004_Hippocampus": 7, "Dataset027_ACDC": 2}


def child(plans_name: str, batch: int, steps: int) -> dict:
    import resource
    import time

    import torch

    from autoseg.networks.call_size import training_images_per_call
    from autoseg.networks.memory_format import ChannelsLast, runs_channels_last
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.fold import TrainingOptions, autocast_dtype
    from bench_call_size import CPU, step_loop

    plans = load_plans(REPO / "plans" / f"{plans_name}.json")
    plan = plans.architecture("3d_fullres", "unet")
    network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, 3, True).train()
    loop = step_loop(network, plans.num_segmentation_heads, autocast_dtype(CPU, TrainingOptions()),
                     training_images_per_call(plan.patch_size, CPU))
    if runs_channels_last("unet", 3, CPU, training=True):
        loop.model = ChannelsLast(network, 3)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, plans.num_input_channels, *plan.patch_size, generator=generator),
                torch.randint(0, plans.num_segmentation_heads, (batch, *plan.patch_size), generator=generator))
               for _ in range(2)]
    for index in range(2):
        loop.train_step(*batches[index])
    seconds = []
    for index in range(steps):
        start = time.perf_counter()
        loop.train_step(*batches[index % 2])
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tunables": os.environ.get("GLIBC_TUNABLES", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", default=list(BATCH))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    with_pages = child_env(AUTOSEG_HUGE_PAGES="1")
    if "glibc.malloc.hugetlb" not in with_pages.get("GLIBC_TUNABLES", ""):
        sys.exit("transparent huge pages are off here ('never') or this is not Linux: nothing to compare")
    without = {k: v for k, v in child_env(AUTOSEG_HUGE_PAGES="0").items() if k != "GLIBC_TUNABLES"}
    print("| plan | batch | s / step without | with huge pages | ratio | peak RSS MB without | with |")
    print("|---|---|---|---|---|---|---|")
    for plans_name in args.plans:
        runs: dict[str, list[dict]] = {"without": [], "with": []}
        for _ in range(args.repeats):
            for side, env in (("without", without), ("with", with_pages)):
                spec = json.dumps([plans_name, BATCH[plans_name], args.steps])
                out = subprocess.run([sys.executable, __file__, "--child", spec], env=env, check=True,
                                     capture_output=True, text=True).stdout
                runs[side].append(json.loads(out.strip().splitlines()[-1]))
        step = {side: statistics.median(r["seconds"] for r in rows) for side, rows in runs.items()}
        rss = {side: max(r["maxrss_mb"] for r in rows) for side, rows in runs.items()}
        print(f"| {plans_name} 3d_fullres unet | {BATCH[plans_name]} | {step['without']:.2f} | {step['with']:.2f} | "
              f"{step['with'] / step['without']:.2f} | {rss['without']:.0f} | {rss['with']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
