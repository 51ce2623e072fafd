#!/usr/bin/env python3
"""Training speed of autoseg against nnU-Net v2 on a 3d_fullres plan, same machine, same run.

    python scripts/bench_train.py [--dataset hippocampus|acdc] [--iters 20] [--skip-nnunet] [--no-fp32]

Each tool trains fold 0 for one epoch of ``--iters`` iterations at the same patch and batch
(Hippocampus: 40x56x40, batch 7 in both plans; ACDC: 20x256x224, where autoseg plans batch 3
and nnU-Net 4, so autoseg's plan is given nnU-Net's batch, said in the output; autoseg trains at
the plan's batch, not its CPU default of 2 for 3D, so that an iteration is the same work), with its
default per-epoch validation (nnU-Net: 50 batches per 250 iterations; autoseg without a
budget the same, so ``--iters / 5`` batches on both sides), as a command of its own started
by this script:

- nnU-Net: ``nnUNetv2_train`` with a trainer of that epoch shape (written into the peers
  environment, the way nnU-Net takes custom trainers; it also records each ``train_step``'s
  time), fp32 (its only CPU mode); the run is stopped at its "Training done." line.
- autoseg: the ``autoseg train`` command's wiring in a subprocess (defaults: bf16 autocast
  on CPUs with native bf16, augmentation workers), and again with ``--fp32`` (unless
  ``--no-fp32``); a callback records each iteration's time.

Two figures per tool: the **whole run** (wall seconds from the command's start to the final
checkpoint, so start-up, data loading, worker start, the validation and the checkpoint
are included on both sides, divided by the iterations) and the **steady-state step** (the
median iteration after two warm-up ones). Prints both and the ratio autoseg / nnU-Net of
iterations per second for each. Run it alone: both sides see the same machine only then.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from bench_accuracy import dataset_number, nnunet_env, parse_nnunet_log, run_logged  # noqa: E402
from child_env import child_env  # noqa: E402

from autoseg.planning.plans import load_plans, save_plans  # noqa: E402

SHARED = REPO.parent / "shared"
DATASETS = {"hippocampus": "Dataset004_Hippocampus", "acdc": "Dataset027_ACDC"}  # --dataset: folder in ../shared/data

TRAINER = '''
import json
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_autosegBench(nnUNetTrainer):
    # nnU-Net reads its constructor's arguments by name: the signature must be spelled out.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = {val_iters}
        self.bench_step_seconds = []

    def train_step(self, batch: dict) -> dict:
        start = time.perf_counter()
        result = super().train_step(batch)
        self.bench_step_seconds.append(time.perf_counter() - start)
        return result

    def on_train_end(self):
        super().on_train_end()
        print("bench step seconds: " + json.dumps(self.bench_step_seconds), flush=True)
'''

# The `autoseg train` command's wiring (cli.STARTED is the command's start), plus a callback that
# records each iteration's time; writes {"steps": [...]} to argv[-1].
AUTOSEG = '''
import json, sys, time
from autoseg.cli import STARTED
from pathlib import Path
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans
from autoseg.training import TrainingOptions, train_fold

raw, pre, res, name, iters, fp32, record = sys.argv[1:]
roots = Roots(Path(raw), Path(pre), Path(res))
steps = []

class Steps:
    def on_iteration_end(self, loop, iteration, loss, seconds):
        steps.append(seconds)

# The plan's batch (nnU-Net's), not the CPU's default of 2 for 3D: an iteration is the same work on both sides.
batch = load_plans(roots.plans_file(name)).architecture("3d_fullres", "unet").batch_size
options = TrainingOptions(epochs=1, iters_per_epoch=int(iters), val_iters=max(1, int(iters) // 5), seed=0,
                          amp=fp32 != "1", validate_at_end=False, progress=False, started=STARTED, batch_size=batch)
out = train_fold(roots, name, "3d_fullres", "0", options=options, callbacks=[Steps()])
Path(record).write_text(json.dumps({"steps": steps, "final": str(out / "checkpoint_final.pt")}))
'''


def steady(steps: list[float]) -> float:
    return statistics.median(steps[2:] if len(steps) > 4 else steps)


def autoseg_run(work: Path, name: str, iters: int, fp32: bool) -> dict:
    label = "fp32" if fp32 else "default"
    record = work / f"autoseg_{label}.json"
    start, _, _ = run_logged([sys.executable, "-c", AUTOSEG, str(work / "raw"), str(work / "pre"),
                              str(work / f"res_{label}"), name, str(iters), "1" if fp32 else "0", str(record)],
                             child_env(), work / f"autoseg_{label}.log")
    result = json.loads(record.read_text())
    whole = Path(result["final"]).stat().st_mtime - start
    return {"whole": whole / iters, "steady": steady(result["steps"])}


def nnunet_plan(work: Path, name: str) -> dict | None:
    """nnU-Net's 3d_fullres plan (planned and preprocessed here), or None where nnU-Net is missing."""
    try:
        env = nnunet_env(work)
    except SystemExit as missing:
        print(missing)
        return None
    plans_file = work / "nn_pre" / name / "nnUNetPlans.json"
    if not plans_file.exists():
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", dataset_number(name), "-c", "3d_fullres", "-np", "2"],
                       env=env, check=True, capture_output=True)
    return json.loads(plans_file.read_text())["configurations"]["3d_fullres"]


def same_patch_and_batch(work: Path, name: str, reference: dict) -> str:
    """Gives autoseg's unet plan nnU-Net's batch (its patch must already be nnU-Net's); says what changed.
    The batch is not part of the preprocessed data's identifier, so the preprocessing stays valid."""
    plans_file = work / "pre" / name / "plans.json"
    plans = load_plans(plans_file)
    unet = plans.architecture("3d_fullres", "unet")
    if unet.patch_size != reference["patch_size"]:
        sys.exit(f"not like for like: autoseg plans patch {unet.patch_size}, nnU-Net {reference['patch_size']}")
    if unet.batch_size == reference["batch_size"]:
        return f"batch {unet.batch_size} in both plans"
    said = f"batch {reference['batch_size']} (nnU-Net's plan; autoseg's plans {unet.batch_size}, given nnU-Net's here)"
    unet.batch_size = reference["batch_size"]
    save_plans(plans, plans_file)
    return said


def nnunet_run(work: Path, name: str, iters: int) -> dict | None:
    env = nnunet_env(work)
    venv = Path(env["PATH"].split(":")[0]).parent
    trainers = next((venv / "lib").glob("python3*/site-packages/nnunetv2/training/nnUNetTrainer"))
    (trainers / "nnUNetTrainer_autosegBench.py").write_text(TRAINER.format(iters=iters, val_iters=max(1, iters // 5)))
    log = work / "nnunet_train.log"
    _, _, done = run_logged(["nnUNetv2_train", dataset_number(name), "3d_fullres", "0", "-tr",
                             "nnUNetTrainer_autosegBench", "-device", "cpu"], env, log, stop_at="bench step seconds")
    text = log.read_text()
    if done is None or parse_nnunet_log(text).done_timestamp is None:
        print(f"nnU-Net: no finished epoch; see {log}")
        return None
    # Printed right after "Training done." (which follows its final checkpoint): the run's end.
    steps = json.loads(re.search(r"bench step seconds: (\[.*\])", text).group(1))
    return {"whole": done / iters, "steady": steady(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="hippocampus")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--no-fp32", action="store_true", help="leave out autoseg's --fp32 run")
    args = parser.parse_args()
    name = DATASETS[args.dataset]
    source = SHARED / "data" / name
    if not source.is_dir():
        sys.exit(f"skipped: {source} is missing")
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    (work / "raw").mkdir()
    (work / "raw" / name).symlink_to(source)
    subprocess.run([sys.executable, "-m", "autoseg", "plan-and-preprocess", "-d", name, "-c", "3d_fullres", "-a",
                    "unet", f"--raw={work / 'raw'}", f"--preprocessed={work / 'pre'}"], check=True,
                   capture_output=True, env=child_env())
    nnunet = None if args.skip_nnunet else nnunet_plan(work, name)
    shape = same_patch_and_batch(work, name, nnunet) if nnunet else "autoseg's plan"
    runs = (("default (bf16 where native)", False),) + (() if args.no_fp32 else (("--fp32", True),))
    results = {f"autoseg {label}": autoseg_run(work, name, args.iters, fp32) for label, fp32 in runs}
    if nnunet:
        reference = nnunet_run(work, name, args.iters)
        if reference:
            results["nnU-Net (fp32)"] = reference
    print(f"\n{args.iters} iterations + {max(1, args.iters // 5)} validation batches each, {name} 3d_fullres, "
          f"patch {'x'.join(map(str, nnunet['patch_size'])) if nnunet else ''} {shape}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| tool | whole run s / iteration | steady step s | whole-run ratio | steady ratio |\n|---|---|---|---|---|")
    reference = results.get("nnU-Net (fp32)")
    for tool, result in results.items():
        ratios = [f"{reference[key] / result[key]:.2f}" if reference else "n/a" for key in ("whole", "steady")]
        print(f"| {tool} | {result['whole']:.2f} | {result['steady']:.2f} | {ratios[0]} | {ratios[1]} |")


if __name__ == "__main__":
    main()
