#!/usr/bin/env python3
"""Does ``--warmup-epochs`` help or harm? The same short runs without warm-up, with autoseg's warm-up
(a ramp on the gradients that enter SGD's momentum) and with the reference it replaced (a ramp on
the learning rate, autoseg's until 2026-12-04).

    python scripts/bench_warmup.py [--seeds 0 1 2] [--epochs 20] [--iters 30] [--work DIR]

Hippocampus 2d, fold 0 cut to its first 20 training cases as in ``bench_transfer.py`` (same work
folder by default: its plan and split are reused, or made), from scratch, a fixed number of
iterations (no time budget: every arm takes the same steps), one-epoch warm-up; prints per seed
the validation pseudo-Dice of the last epoch (mean over the two classes) of each arm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.paths import Roots  # noqa: E402
from autoseg.training import TrainingOptions, train_fold  # noqa: E402
from autoseg.training.finetune import FineTuningPhases  # noqa: E402
from scripts.bench_transfer import DATA, TARGET, prepare_target  # noqa: E402


def learning_rate_ramp(self, optimizer, args, kwargs) -> None:
    """The reference: the warm-up factor scales each group's learning rate for the step (the loop sets
    the schedule's rate again before the next one)."""
    factor = self.last_factor = self.warmup_factor()
    for group in optimizer.param_groups:
        group["lr"] *= factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iters", type=int, default=30, help="iterations per epoch")
    parser.add_argument("--labelled", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoseg_bench_transfer"))
    args = parser.parse_args()
    if not (DATA / TARGET).is_dir():
        sys.exit(f"skipped: {DATA / TARGET} is missing")
    raw, pre = args.work / "raw", args.work / "pre"
    prepare_target(args.work, "2d", args.labelled)

    arms = {"none": 0, "gradient ramp (autoseg)": 1, "learning-rate ramp (reference)": 1}
    ours = FineTuningPhases._before_step
    results: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm, warmup in arms.items():
            FineTuningPhases._before_step = learning_rate_ramp if arm.startswith("learning") else ours
            options = TrainingOptions(epochs=args.epochs, iters_per_epoch=args.iters, val_iters=3, seed=seed,
                                      validate_at_end=False, progress=False, warmup_epochs=warmup)
            folder = args.work / f"warmup_{arm.split()[0]}_{seed}"
            out = train_fold(Roots(raw, pre, folder), TARGET, "2d", 0, "unet", options)
            last = json.loads((out / "training_log.jsonl").read_text().splitlines()[-1])
            results[arm].append(last["pseudo_dice_mean"])
    FineTuningPhases._before_step = ours
    print(f"\nHippocampus 2d fold 0, {args.labelled} cases, {args.epochs} x {args.iters} iterations from scratch, "
          f"one-epoch warm-up; last epoch's pseudo-Dice, seeds {args.seeds}")
    for arm, values in results.items():
        print(f"{arm:<32} {statistics.mean(values):.3f}  ({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
