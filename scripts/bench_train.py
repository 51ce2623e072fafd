#!/usr/bin/env python3
"""Training speed of autoseg against nnU-Net v2 on Hippocampus 3d_fullres, same machine, same run.

    python scripts/bench_train.py [--iters 20] [--skip-nnunet] [--budget-minutes 20 [--budget-bf16]]

autoseg: ``train_fold`` with the planned patch (40x56x40) and batch (7), one epoch of
``--iters`` + 2 iterations; the median iteration after two warm-up ones gives seconds per
iteration, in fp32 and with ``--cpu-bf16``, and the share of time spent waiting for
batches. nnU-Net: ``nnUNetv2_train`` with a trainer of one epoch of ``--iters`` iterations (written into the peers environment, the way nnU-Net
takes custom trainers), its logged epoch time; it is stopped before its final validation.
Prints iterations per second of each and the ratio autoseg / nnU-Net (target >= 1.5).

With ``--budget-minutes M`` it then compares learning per unit of time: nnU-Net trains fold 0
with as many epochs (of 25 iterations, 5 validation batches) as its speed measured above fits
in M minutes, and validates with its own end-of-training validation; autoseg trains fold 0
with ``--time-budget M`` (same epoch shape, the schedule fitted to the budget after a few
iterations) and its end-of-fold validation. Prints both mean validation Dice (target: autoseg
>= nnU-Net). On a loaded machine run it alone: both sides see the same machine only if
nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

TRAINER = '''
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_autosegBench(nnUNetTrainer):
    # nnU-Net reads its constructor's arguments by name: the signature must be spelled out.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = 1
'''


BUDGET_TRAINER = '''
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_autosegBudget(nnUNetTrainer):
    # The schedule fitted to the wall-clock budget from nnU-Net's own measured speed.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = {val_iters}
'''
# Both sides train epochs of this many iterations and validate on this many batches per epoch.
BUDGET_ITERS, BUDGET_VAL_ITERS = 25, 5


class _IterationTimes:
    def __init__(self):
        self.seconds: list[float] = []

    def on_iteration_end(self, loop, iteration, loss, seconds):
        self.seconds.append(seconds)


def autoseg_seconds_per_iteration(roots, name: str, iters: int, bf16: bool, workers: int) -> tuple[float, float, float]:
    """(median seconds of an iteration after two warm-up ones, fraction of the epoch spent waiting for data,
    the whole epoch's seconds per iteration: warm-up and validation included, as nnU-Net's epoch time)."""
    from autoseg.training import TrainingOptions, train_fold

    times = _IterationTimes()
    options = TrainingOptions(epochs=1, iters_per_epoch=iters + 2, val_iters=1, num_workers=workers, seed=0,
                              cpu_bf16=bf16, validate_at_end=False, progress=False)
    output = train_fold(roots, name, "3d_fullres", "0", options=options, callbacks=[times])
    entry = json.loads((output / "training_log.jsonl").read_text().splitlines()[-1])
    steady = sorted(times.seconds[2:])
    return (steady[len(steady) // 2], entry["data_wait_seconds"] / entry["epoch_seconds"],
            entry["epoch_seconds"] / (iters + 2))


def nnunet_environment(work: Path) -> tuple[dict, Path] | None:
    """nnU-Net's environment (its roots under ``work``) and its trainer folder, or None if not installed."""
    venv = Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv"))
    if not (venv / "bin" / "nnUNetv2_train").exists():
        print(f"nnU-Net: not installed at {venv} (run {SHARED / 'peers' / 'setup.sh'})")
        return None
    trainers = next((venv / "lib").glob("python3*/site-packages/nnunetv2/training/nnUNetTrainer"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nn_pre"),
               nnUNet_results=str(work / "nn_res"), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    return env, trainers


def nnunet_seconds_per_iteration(work: Path, name: str, iters: int) -> float | None:
    found = nnunet_environment(work)
    if found is None:
        return None
    env, trainers = found
    (trainers / "nnUNetTrainer_autosegBench.py").write_text(TRAINER.format(iters=iters))
    number = str(int(re.match(r"Dataset(\d+)_", name).group(1)))
    if not (work / "nn_pre" / name / "nnUNetPlans.json").exists():
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", number, "-c", "3d_fullres", "-np", "2"], env=env,
                       check=True, capture_output=True)
    # In its own session: nnU-Net's data-loader workers are killed with it (they outlive a plain kill).
    process = subprocess.Popen(["nnUNetv2_train", number, "3d_fullres", "0", "-tr", "nnUNetTrainer_autosegBench",
                                "-device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    epoch_time, lines = None, []
    for line in process.stdout:
        lines.append(line)
        match = re.search(r"Epoch time: ([\d.]+) s", line)
        if match:
            epoch_time = float(match.group(1))
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if epoch_time is None:
        print("nnU-Net: no epoch time in its output; its last lines:\n" + "".join(lines[-15:]))
        return None
    return epoch_time / iters


def autoseg_budget_dice(roots, name: str, minutes: float, bf16: bool, workers: int) -> tuple[float, float]:
    """Fold 0 trained for ``minutes`` (schedule fitted to the budget), then validated: (mean Dice, training s)."""
    from autoseg.training import TrainingOptions, train_fold

    options = TrainingOptions(iters_per_epoch=BUDGET_ITERS, val_iters=BUDGET_VAL_ITERS, time_budget_minutes=minutes,
                              num_workers=workers, seed=0, cpu_bf16=bf16, validate_at_end=True, progress=False)
    output = train_fold(roots, name, "3d_fullres", "0", options=options)
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    summary = json.loads((output / "validation" / "summary.json").read_text())
    return summary["mean_foreground"]["dice"], sum(entry["epoch_seconds"] for entry in log)


def nnunet_budget_dice(work: Path, name: str, minutes: float, seconds_per_iteration: float) -> tuple[float, float] | None:
    """nnU-Net's fold 0 with as many epochs as its measured speed fits in ``minutes``, then its own
    validation: (mean foreground Dice, training seconds from its epoch times)."""
    found = nnunet_environment(work)
    if found is None:
        return None
    env, trainers = found
    # Validation batches cost about a third of a training iteration (forward only).
    epoch_seconds = seconds_per_iteration * (BUDGET_ITERS + BUDGET_VAL_ITERS / 3)
    epochs = max(1, int(minutes * 60 / epoch_seconds))
    (trainers / "nnUNetTrainer_autosegBudget.py").write_text(
        BUDGET_TRAINER.format(epochs=epochs, iters=BUDGET_ITERS, val_iters=BUDGET_VAL_ITERS))
    number = str(int(re.match(r"Dataset(\d+)_", name).group(1)))
    result = subprocess.run(["nnUNetv2_train", number, "3d_fullres", "0", "-tr", "nnUNetTrainer_autosegBudget",
                             "-device", "cpu"], env=env, capture_output=True, text=True)
    summaries = list((work / "nn_res").glob(f"{name}/nnUNetTrainer_autosegBudget__*/fold_0/validation/summary.json"))
    if result.returncode or not summaries:
        print("nnU-Net budget run failed; its last lines:\n" + "\n".join(result.stdout.splitlines()[-15:]))
        return None
    trained = sum(float(t) for t in re.findall(r"Epoch time: ([\d.]+) s", result.stdout))
    return json.loads(summaries[0].read_text())["foreground_mean"]["Dice"], trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--only-nnunet", action="store_true", help="measure nnU-Net alone")
    parser.add_argument("--budget-minutes", type=float, default=0,
                        help="then train each for this wall-clock budget and compare fold-0 validation Dice")
    parser.add_argument("--budget-bf16", action="store_true", help="autoseg's budget run with --cpu-bf16")
    args = parser.parse_args()
    name = "Dataset004_Hippocampus"
    source = SHARED / "data" / name
    if not source.is_dir():
        sys.exit(f"skipped: {source} is missing")
    from autoseg.cli import main as autoseg_main
    from autoseg.paths import Roots

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    (work / "raw").mkdir()
    (work / "raw" / name).symlink_to(source)
    roots = Roots(work / "raw", work / "pre", work / "res")
    if not args.only_nnunet:
        autoseg_main(["plan-and-preprocess", "-d", name, "-c", "3d_fullres", "-a", "unet", f"--raw={roots.raw}",
                      f"--preprocessed={roots.preprocessed}", f"--results={roots.results}"])
    results = {}
    for label, bf16 in () if args.only_nnunet else (("fp32", False), ("bf16", True)):
        start = time.perf_counter()
        results[label], waiting, whole = autoseg_seconds_per_iteration(roots, name, args.iters, bf16, args.workers)
        print(f"autoseg {label}: {results[label]:.2f} s/iteration ({1 / results[label]:.3f} it/s; whole epoch "
              f"{whole:.2f} s/iteration), {100 * waiting:.1f}% of the epoch waiting for batches, "
              f"bench step {time.perf_counter() - start:.0f} s", flush=True)
    if args.skip_nnunet:
        return
    reference = nnunet_seconds_per_iteration(work, name, args.iters)
    if reference is None:
        return
    print(f"nnU-Net (fp32, its default on the CPU): {reference:.2f} s/iteration ({1 / reference:.3f} it/s)")
    for label, seconds in results.items():
        print(f"ratio autoseg {label} / nnU-Net iterations per second: {reference / seconds:.2f} (target >= 1.5)")
    if args.budget_minutes > 0:
        nnunet = nnunet_budget_dice(work, name, args.budget_minutes, reference)
        if nnunet:
            print(f"nnU-Net, {args.budget_minutes:g} min budget: mean validation Dice {nnunet[0]:.4f} "
                  f"({nnunet[1] / 60:.1f} min of epochs)", flush=True)
        dice, trained = autoseg_budget_dice(Roots(roots.raw, roots.preprocessed, work / "res_budget"), name, args.budget_minutes, args.budget_bf16, args.workers)
        print(f"autoseg {'bf16' if args.budget_bf16 else 'fp32'}, {args.budget_minutes:g} min budget: mean validation "
              f"Dice {dice:.4f} ({trained / 60:.1f} min of epochs)")
        if nnunet:
            print(f"Dice autoseg - nnU-Net at the same budget: {dice - nnunet[0]:+.4f} (target >= 0)")


if __name__ == "__main__":
    main()
