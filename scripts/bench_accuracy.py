#!/usr/bin/env python3
"""Learning per unit of time: autoseg against nnU-Net v2 on the same data, fold and wall-clock budget.

    python scripts/bench_accuracy.py [--dataset hippocampus|ph2|acdc] [--fold F] [--trainer nnUNetTrainer_1epoch]
                                     [--nnunet-iterations N] [--also-fp32] [--also-batch B ...] [--work DIR]

One run, both tools, one machine:
1. nnU-Net (``../shared/peers``' venv) plans, preprocesses and trains fold F (0) with ``--trainer``
   (``nnUNetTrainer_1epoch``: 250 iterations; ``_5epochs`` ... for longer budgets). Its training
   time runs from the start of ``nnUNetv2_train`` to its "Training done." line (start-up, data
   loading, its per-epoch validation and the final checkpoint included; its end-of-training
   validation is not: the process is stopped there). ``--nnunet-iterations N`` shortens the trainer's
   epochs to N iterations and N/5 validation batches (its own ratio, 50 per 250), for a dataset whose
   full epoch outlasts a working session on the CPU: a smaller budget, named as such in the table.
2. autoseg plans and preprocesses, takes nnU-Net's ``splits_final.json`` as its ``splits.json``
   (so both validate on the same cases), and trains fold F with ``--time-budget`` equal to
   nnU-Net's training time, everything else default (on a CPU: bf16 where it has native bf16
   units, and batch 2 for a 3D configuration, see ``training.fold.training_batch_size``). Its
   training time runs from the start of ``autoseg train`` to ``checkpoint_final.pt`` (start-up,
   loading, per-epoch validation included; ``--no-validation`` leaves out the end-of-fold
   prediction, as nnU-Net's is left out).
   ``--also-fp32`` trains a second autoseg model with ``--fp32`` at the same budget, ``--also-batch B``
   one more with ``--batch-size B`` (repeatable; how the CPU's batch rule was chosen, on fold 1).
3. Each tool predicts the fold's validation cases from the raw images (its own command, TTA on,
   one fold); ``autoseg evaluate`` scores both (Dice, HD95, NSD at 1 mm), and the Dice is
   cross-checked per case against MONAI's ``compute_dice``.

Prints one table: dataset, configuration, tool, training seconds, iterations, Dice per class,
mean HD95 and NSD. With ``--work DIR`` every finished step is kept in DIR and skipped when the
script is run again with the same DIR (a later run then says which steps it reused).

``--resumable`` (with ``--work``) is for a budget longer than a working session (ACDC's one epoch is
3.5-5 hours of nnU-Net on 2 cores): each tool's training may be stopped (the session ends) and goes
on from its last checkpoint when the same command runs again. nnU-Net's epochs then run as
``EPOCH_PARTS`` shorter ones (``SPLIT_EPOCHS``: as many iterations and validation batches in all,
each part at the learning rate of the epoch it belongs to, a checkpoint after each), continued with
``nnUNetv2_train --c``; autoseg's with ``autoseg train --continue`` (its schedule, fitted to the
whole budget at the start, goes on). Each tool's training time is the sum of its parts, each from
its command's start to its last checkpoint (start-ups included; work after the last checkpoint of
a stopped part is lost and not counted). Stop a part right after a checkpoint to lose least.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = {  # --dataset: (folder in ../shared/data, configuration)
    "hippocampus": ("Dataset004_Hippocampus", "3d_fullres"),
    "ph2": ("Dataset010_PH2Skin", "2d"),
    "acdc": ("Dataset027_ACDC", "3d_fullres"),
}
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?): (.*)$")


@dataclass
class NnunetTrainingLog:
    """What nnU-Net's console log says about a training run."""

    epochs: int  # epochs finished
    iterations_per_epoch: int | None
    first_timestamp: datetime | None
    done_timestamp: datetime | None  # its "Training done." line
    pseudo_dice: list[float]  # of the last epoch
    epoch_seconds: list[float]


def parse_nnunet_log(text: str) -> NnunetTrainingLog:
    """Read nnU-Net v2's training output (console or ``training_log_*.txt``)."""
    first = done = None
    epochs_started, pseudo, epoch_seconds, iterations = 0, [], [], None
    for raw in text.splitlines():
        match = _LOG_LINE.match(raw.strip())
        if not match:
            continue
        stamp, message = datetime.fromisoformat(match.group(1)), match.group(2).strip()
        first = first or stamp
        if re.fullmatch(r"Epoch \d+", message):
            epochs_started += 1
        elif message.startswith("Pseudo dice"):
            values = re.sub(r"np\.float\d+\(", "", message.split("dice", 1)[1])  # "[np.float32(0.77), ...]"
            pseudo = [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", values)]
        elif message.startswith("Epoch time:"):
            epoch_seconds.append(float(re.search(r"([\d.]+) s", message).group(1)))
        elif message.startswith("Training done."):
            done = stamp
        found = re.search(r"'num_iterations_per_epoch': (\d+)", message)
        if found:
            iterations = int(found.group(1))
    return NnunetTrainingLog(len(epoch_seconds), iterations, first, done, pseudo, epoch_seconds)


class Paused(Exception):
    """A resumable training part stopped at ``--pause-at`` (right after a checkpoint): the next run goes on."""


def run_logged(command: list[str], env: dict, log: Path, stop_at: str | None = None,
               pause: tuple[float, str] | None = None) -> tuple[float, float, float | None]:
    """Run ``command`` (in its own session, so its workers go with it), its output to ``log``. Returns (its start
    as a time stamp, wall seconds until it ended, seconds until a line containing ``stop_at``, where it is stopped).
    ``pause`` (a time stamp, a pattern): past that time, the first line matching the pattern (printed once an
    epoch's checkpoints are written) stops it and raises ``Paused``."""
    start = time.time()
    stopped_at = None
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            if stop_at and stop_at in line:
                stopped_at = time.time() - start
                os.killpg(process.pid, signal.SIGKILL)
                break
            if pause and time.time() > pause[0] and re.search(pause[1], line):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise Paused(f"paused at {datetime.now():%H:%M:%S} after a checkpoint; see {log}")
        process.wait()
    if stopped_at is None and process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}; see {log}")
    return start, time.time() - start, stopped_at


class Work:
    """The working folder and its record of finished steps (reused with --work)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.record_file = folder / "record.json"
        self.record = json.loads(self.record_file.read_text()) if self.record_file.exists() else {}

    def step(self, key: str, function):
        if key in self.record:
            print(f"[{key}] reused from {self.record_file}", flush=True)
            return self.record[key]
        print(f"[{key}] {datetime.now():%H:%M:%S}, load average {os.getloadavg()[0]:.1f}", flush=True)
        self.record[key] = function()
        write_atomically(self.record_file, json.dumps(self.record, indent=1))
        return self.record[key]


def write_atomically(path: Path, text: str) -> None:
    """A record a kill mid-write would leave half-written (and the next run unable to read) is renamed into place,
    by autoseg's own writer (imported here: the script puts the repository on the path only when run)."""
    from autoseg.records import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def dataset_number(name: str) -> str:
    """``Dataset027_ACDC`` -> ``27``, as nnU-Net's ``-d`` takes it."""
    return str(int(re.match(r"Dataset(\d+)_", name).group(1)))


def nnunet_env(work: Path) -> dict:
    venv = peers_venv()
    if not (venv / "bin" / "nnUNetv2_train").exists() and importlib.util.find_spec("nnunetv2") is None:
        sys.exit(f"nnU-Net is neither installed at {venv} (run {SHARED / 'peers' / 'setup.sh'}) nor importable here")
    return dict(os.environ, PYTHONUNBUFFERED="1", nnUNet_raw=str(work / "raw"),
                nnUNet_preprocessed=str(work / "nn_pre"), nnUNet_results=str(work / "nn_res"),
                PATH=f"{venv / 'bin'}:{os.environ['PATH']}")


def peers_venv() -> Path:
    return Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv"))


# nnunetv2's console scripts (its package's entry points), for a machine where nnunetv2 was unpacked onto
# PYTHONPATH without them (the GPU machine: scripts/device_site.sh).
NNUNET_ENTRY_POINTS = {
    "nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
}


def nnunet_command(name: str, *arguments: str, prelude: str = "") -> list[str]:
    """nnU-Net's command from the peers venv where it is installed there, else through this Python.
    ``prelude``: Python code run in nnU-Net's process before the command's entry point."""
    installed = (peers_venv() / "bin" / name).exists()
    if installed and not prelude:
        return [name, *arguments]  # found on nnunet_env's PATH
    python = str(peers_venv() / "bin" / "python") if installed else sys.executable
    module, function = NNUNET_ENTRY_POINTS[name].split(":")
    return [python, "-c", f"{prelude}\nimport sys; from {module} import {function}; sys.argv[0] = {name!r}; "
                          f"sys.exit({function}())", *arguments]


def torch_device() -> str:
    """Both tools train and predict on the GPU where there is one (nnU-Net needs to be told)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autoseg_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "autoseg", *arguments]


# Run before nnUNetv2_train: every trainer's epoch shortened to {iterations} iterations and a fifth of that in
# validation batches (nnU-Net's own ratio). The base class's constructor sets both, and every trainer calls it first.
SHORTEN_EPOCHS = """
import functools
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
_construct = nnUNetTrainer.__init__
@functools.wraps(_construct)  # nnU-Net reads its own constructor's signature to record its arguments
def _shortened(self, *args, **kwargs):
    _construct(self, *args, **kwargs)
    self.num_iterations_per_epoch = {iterations}
    self.num_val_iterations_per_epoch = max(1, {iterations} // 5)
    print("bench_accuracy: epochs shortened to", self.num_iterations_per_epoch, "iterations and",
          self.num_val_iterations_per_epoch, "validation batches", flush=True)
nnUNetTrainer.__init__ = _shortened
"""


# --resumable: every epoch of nnU-Net's trainer runs as EPOCH_PARTS shorter ones, each ending in
# checkpoint_latest.pth, so that a run stopped with its session goes on (nnUNetv2_train --c) losing at most one
# part. The trainer builds its optimiser and poly schedule (over its own epochs) in on_train_start, before the
# loop reads num_epochs: the counts change after that, and each short epoch asks the schedule for the learning
# rate of the trainer's epoch it belongs to (nnUNetTrainer_1epoch: 1e-2 throughout, as unsplit).
EPOCH_PARTS = 25
SPLIT_EPOCHS = """
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
_train_start = nnUNetTrainer.on_train_start
def _split_train_start(self):
    _train_start(self)
    epochs = self.num_epochs
    self.num_epochs = epochs * {parts}
    self.num_iterations_per_epoch //= {parts}
    self.num_val_iterations_per_epoch = max(1, self.num_val_iterations_per_epoch // {parts})
    self.save_every = 1
    step = self.lr_scheduler.step
    self.lr_scheduler.step = lambda current_step=None: step(None if current_step is None else current_step // {parts})
    print("bench_accuracy:", epochs, "epoch(s) run as", self.num_epochs, "of", self.num_iterations_per_epoch,
          "iterations and", self.num_val_iterations_per_epoch, "validation batches, from epoch", self.current_epoch,
          flush=True)
nnUNetTrainer.on_train_start = _split_train_start
"""


class Parts:
    """The parts of a training that a session's end may stop (``--resumable``), in a JSON file: each part's start
    is written before it runs; a part that did not finish counts until its last checkpoint, which is where the
    next part goes on from (nothing after it survived)."""

    def __init__(self, file: Path):
        self.file = file
        self.parts: list[dict] = json.loads(file.read_text()) if file.exists() else []

    def close_interrupted(self, checkpoints: list[Path]) -> None:
        if self.parts and self.parts[-1].get("seconds") is None:
            start = self.parts[-1]["start"]
            ends = [path.stat().st_mtime for path in checkpoints if path.exists() and path.stat().st_mtime > start]
            self.parts[-1]["seconds"] = max(ends) - start if ends else 0.0
            self.parts[-1]["stopped"] = True
            self._save()

    def begin(self) -> int:
        self.parts.append({"start": time.time(), "seconds": None})
        self._save()
        return len(self.parts) - 1

    def finish(self, seconds: float) -> None:
        """The last part's seconds; the training is over, so say what its sum leaves out."""
        self.parts[-1]["seconds"] = seconds
        self._save()
        for number, part in enumerate(self.parts, 1):
            if part.get("excluded_s"):
                print(f"{self.file.name}: part {number}: {part['excluded_s']:.0f} s not counted "
                      f"({part.get('excluded_why', 'no reason given')})", flush=True)

    @property
    def seconds(self) -> float:
        """The parts' sum, less what a part's ``excluded_s`` says was not the tool's (written into the file by
        hand with its ``excluded_why``: say, other work that ran beside the part and lengthened it)."""
        return sum((part["seconds"] or 0.0) - part.get("excluded_s", 0.0) for part in self.parts)

    def _save(self) -> None:
        write_atomically(self.file, json.dumps(self.parts, indent=1))


# Lines printed once an epoch's checkpoints are on disk: nnU-Net's next epoch starting (on_epoch_end saved
# checkpoint_latest and _best before it), autoseg's epoch report (its callbacks write checkpoints first).
NNUNET_EPOCH_STARTED = r": Epoch \d+$"
AUTOSEG_EPOCH_REPORTED = r"^epoch \d+: train loss"


def train_nnunet(work: Path, number: str, configuration: str, trainer: str, iterations: int | None = None,
                 fold: int = 0, resumable: bool = False, pause_at: float | None = None) -> dict:
    env = nnunet_env(work)
    parts = Parts(work / "nnunet_parts.json") if resumable else None
    if not (parts and parts.parts):  # a continued run planned and preprocessed in its first part
        subprocess.run(nnunet_command("nnUNetv2_plan_and_preprocess", "-d", number, "-c", configuration, "-np", "2"),
                       env=env, check=True, capture_output=True)
    log = work / "nnunet_train.log"
    prelude = SHORTEN_EPOCHS.format(iterations=iterations) if iterations else ""
    continuing = []
    if parts is not None:
        model = next((work / "nn_res").glob(f"*/{trainer}__nnUNetPlans__{configuration}"), None)
        fold_folder = model / f"fold_{fold}" if model else work / "none"
        parts.close_interrupted([fold_folder / "checkpoint_latest.pth", fold_folder / "checkpoint_final.pth"])
        continuing = ["--c"] if parts.parts else []
        log = work / f"nnunet_train_part{parts.begin()}.log"
        prelude += SPLIT_EPOCHS.format(parts=EPOCH_PARTS)
        print(f"nnU-Net's training, part {len(parts.parts)}: {log}", flush=True)
    command = nnunet_command("nnUNetv2_train", number, configuration, str(fold), "-tr", trainer, "-device",
                             torch_device(), *continuing, prelude=prelude)
    pause = (pause_at, NNUNET_EPOCH_STARTED) if parts is not None and pause_at else None
    _, _, done = run_logged(command, env, log, stop_at="Training done.", pause=pause)
    parsed = parse_nnunet_log(log.read_text())
    if done is None:
        sys.exit(f"nnU-Net's training did not finish; see {log}")
    if parts is not None:
        parts.finish(done)
        done = parts.seconds
        split = re.search(r"(\d+) epoch\(s\) run as (\d+) of (\d+) iterations", log.read_text())
        parsed.epochs, parsed.iterations_per_epoch = int(split[1]), int(split[2]) * int(split[3]) // int(split[1])
    # Stopped before its end-of-training validation, nnU-Net has not yet copied the dataset.json and plans
    # that its predictor reads beside the folds: copy the same files, as it would.
    for model in (work / "nn_res").glob(f"*/{trainer}__nnUNetPlans__{configuration}"):
        preprocessed = work / "nn_pre" / model.parent.name
        shutil.copyfile(preprocessed / "dataset.json", model / "dataset.json")
        shutil.copyfile(preprocessed / "nnUNetPlans.json", model / "plans.json")
    per_epoch = iterations or parsed.iterations_per_epoch or 250
    plans = json.loads(next((work / "nn_pre").glob("*/nnUNetPlans.json")).read_text())
    return {"seconds": done, "epochs": parsed.epochs, "iterations": parsed.epochs * per_epoch,
            "batch": plans["configurations"][configuration]["batch_size"], "log": str(log)}


def train_autoseg(work: Path, number: str, configuration: str, budget_s: float, label: str, extra: list[str],
                  fold: int = 0, resumable: bool = False, pause_at: float | None = None) -> dict:
    results = work / f"res_{label}"
    roots = [f"--raw={work / 'raw'}", f"--preprocessed={work / 'pre'}", f"--results={results}"]
    log = work / f"autoseg_{label}_train.log"
    continuing, parts = [], None
    if resumable:  # a part stopped with its session goes on from its last checkpoint
        parts = Parts(work / f"autoseg_{label}_parts.json")
        latest = list(results.glob(f"*/*/fold_{fold}/checkpoint_latest.pt"))
        parts.close_interrupted(latest)
        if latest:
            continuing = ["--continue"]
        else:
            parts.parts = []  # nothing to go on from: it starts again, and so does its time
        log = work / f"autoseg_{label}_train_part{parts.begin()}.log"
        print(f"autoseg's training, part {len(parts.parts)}: {log}", flush=True)
    if not continuing:
        # Not in the record, so not finished (say, stopped with its session): start again from nothing.
        shutil.rmtree(results, ignore_errors=True)
    start, _, _ = run_logged(autoseg_command("train", number, configuration, str(fold), "--time-budget",
                                             f"{budget_s / 60:.4f}", "--no-validation", *continuing, *extra, *roots),
                             child_env(PYTHONUNBUFFERED="1"), log,
                             pause=(pause_at, AUTOSEG_EPOCH_REPORTED) if parts is not None and pause_at else None)
    final = next(results.glob(f"*/*/fold_{fold}/checkpoint_final.pt"))
    history = [json.loads(line) for line in (final.parent / "training_log.jsonl").read_text().splitlines()]
    import torch

    batch = torch.load(final, weights_only=True)["plan"]["batch_size"]  # on the CPU a 3D plan trains at 2
    seconds = final.stat().st_mtime - start
    if parts is not None:
        parts.finish(seconds)
        seconds = parts.seconds
    return {"seconds": seconds, "epochs": len(history),
            "iterations": sum(entry["iterations"] for entry in history), "batch": batch, "log": str(log)}


def validation_inputs(work: Path, source: Path, val_cases: list[str]) -> tuple[Path, Path]:
    """Folders of links to the validation cases' images and labels."""
    images, labels = work / "val_images", work / "val_labels"
    for folder in (images, labels):
        folder.mkdir(exist_ok=True)
    ending = json.loads((source / "dataset.json").read_text())["file_ending"]
    for case in val_cases:
        for image in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            target = images / image.name
            if not target.exists():
                target.symlink_to(image)
        target = labels / f"{case}{ending}"
        if not target.exists():
            target.symlink_to(source / "labelsTr" / f"{case}{ending}")
    return images, labels


def evaluate(work: Path, source: Path, labels: Path, predictions: Path) -> dict:
    """autoseg evaluate's summary, and the largest per-case Dice difference to MONAI's compute_dice."""
    out = predictions.parent / (predictions.name + "_evaluation")
    shutil.rmtree(out, ignore_errors=True)
    finished = subprocess.run(autoseg_command("evaluate", str(labels), str(predictions), "--dataset-json",
                                              str(source / "dataset.json"), "-o", str(out)), capture_output=True,
                              text=True, errors="replace", env=child_env())
    if finished.returncode != 0:
        sys.exit(f"autoseg evaluate failed ({finished.returncode}) on {predictions}:\n{finished.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    # HD95 is undefined where one side of a class is empty, and left out of its mean: a tool that misses a
    # class in many cases would otherwise show the HD95 of its easy cases only. Counted, and printed with it.
    undefined = sum(value.get("n_undefined_hd95", 0) for value in summary["per_class"].values())
    return {"per_class": {name: value["mean"] for name, value in summary["per_class"].items()},
            "mean": summary["mean_foreground"], "hd95_undefined": undefined,
            "hd95_of": len(summary["per_case"]) * len(summary["per_class"]),
            "monai_max_difference": monai_dice_difference(source, summary)}


def monai_dice_difference(source: Path, summary: dict) -> float:
    """Recompute each case's Dice with MONAI and return the largest difference to autoseg's."""
    import torch
    from monai.metrics import compute_dice

    from autoseg.io.images import read_label

    spec = json.loads((source / "dataset.json").read_text())["labels"]
    classes = {name: value for name, value in spec.items() if name not in ("background", "ignore")}
    largest = 0.0
    for row in summary["per_case"]:
        reference, _ = read_label(Path(summary["reference_dir"]) / row["case"])
        prediction, _ = read_label(Path(summary["prediction_dir"]) / row["case"])
        for name, value in classes.items():
            values = value if isinstance(value, list) else [value]
            ref = torch.from_numpy(np.isin(reference, values)[None, None].astype(np.float32))
            pred = torch.from_numpy(np.isin(prediction, values)[None, None].astype(np.float32))
            monai = float(compute_dice(pred, ref, include_background=True, ignore_empty=False)[0, 0])
            ours = row.get(f"{name}/dice")
            if ours is not None and not np.isnan(monai):
                largest = max(largest, abs(monai - ours))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="hippocampus")
    parser.add_argument("--trainer", default="nnUNetTrainer_1epoch", help="nnU-Net's trainer (sets the budget)")
    parser.add_argument("--nnunet-iterations", type=int, metavar="N",
                        help="shorten nnU-Net's epochs to N iterations (a smaller budget, for datasets whose epoch "
                             "outlasts a session)")
    parser.add_argument("--fold", type=int, default=0, help="the fold both tools train and validate (default 0)")
    parser.add_argument("--also-fp32", action="store_true", help="also train autoseg with --fp32 at the same budget")
    parser.add_argument("--also-batch", type=int, action="append", default=[], metavar="B",
                        help="also train autoseg with --batch-size B at the same budget (repeatable)")
    parser.add_argument("--autoseg-budget-s", type=float, metavar="SECONDS",
                        help="autoseg's training budget instead of nnU-Net's measured training time; smaller only: "
                             "for a run whose nnU-Net side was slowed by other work on the machine")
    parser.add_argument("--work", type=Path, help="keep the working folder here and reuse its finished steps")
    parser.add_argument("--resumable", action="store_true",
                        help="(with --work) training that a session's end may stop: running the same command again "
                             "goes on from each tool's last checkpoint")
    parser.add_argument("--pause-at", metavar="HH:MM",
                        help="(with --resumable) after this time (its next occurrence, so past midnight too), stop "
                             "the training running then right after its next checkpoint, to go on in a later run; "
                             "leave it out of a run that can finish: a pause on autoseg's final epoch report comes "
                             "before its final checkpoint, and the next run then pays a start-up to write it")
    parser.add_argument("--data", type=Path, default=SHARED / "data", help="the folder that holds the datasets")
    args = parser.parse_args()
    name, configuration = DATASETS[args.dataset]
    source = args.data.resolve() / name
    if not (source / "dataset.json").is_file():
        sys.exit(f"skipped: {source} is missing")
    number = dataset_number(name)
    folder = args.work or Path(tempfile.mkdtemp(prefix=f"bench_accuracy_{args.dataset}_"))
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    if not (folder / "raw" / name).exists():
        (folder / "raw" / name).symlink_to(source)
    work = Work(folder)
    # A record without a fold is older than --fold: its steps are fold 0's.
    if work.record.setdefault("fold", 0 if work.record else args.fold) != args.fold:
        sys.exit(f"{folder} holds fold {work.record['fold']}'s steps; give fold {args.fold} a working folder of its own")
    print(f"working folder {folder}; fold {args.fold}; {os.cpu_count()} cores", flush=True)

    if args.nnunet_iterations is not None and args.nnunet_iterations < 1:
        sys.exit("--nnunet-iterations must be a positive number")
    if args.resumable and (args.work is None or args.nnunet_iterations is not None):
        sys.exit("--resumable needs --work (where the next run finds the parts) and not --nnunet-iterations "
                 "(the full budget is what outlasts a session)")
    pause_at = None
    if args.pause_at is not None:
        if not args.resumable:
            sys.exit("--pause-at needs --resumable")
        try:
            clock = datetime.strptime(args.pause_at, "%H:%M").time()
        except ValueError:
            sys.exit(f"--pause-at {args.pause_at}: give the time as HH:MM")
        pause_at = datetime.combine(datetime.now().date(), clock).timestamp()
        if pause_at <= time.time():  # the next HH:MM: at 23:00, 00:10 is tomorrow's, not a time already past
            pause_at = datetime.combine(datetime.now().date() + timedelta(days=1), clock).timestamp()
    try:
        run(args, folder, work, name, configuration, source, number, pause_at)
    except Paused as paused:
        sys.exit(f"{paused}; run the same command again to go on")


def run(args, folder: Path, work: Work, name: str, configuration: str, source: Path, number: str,
        pause_at: float | None) -> None:
    if any(batch < 1 for batch in args.also_batch):
        sys.exit("--also-batch must be a positive number")
    if args.fold < 0:
        sys.exit("--fold must be 0 or more")
    shortened = f" ({args.nnunet_iterations} iterations an epoch)" if args.nnunet_iterations else ""
    trained = {"nnU-Net": work.step(f"train nnU-Net {args.trainer}{shortened}",
                                    lambda: train_nnunet(folder, number, configuration, args.trainer,
                                                         args.nnunet_iterations, args.fold, args.resumable,
                                                         pause_at))}
    splits = json.loads((folder / "nn_pre" / name / "splits_final.json").read_text())
    if not 0 <= args.fold < len(splits):
        sys.exit(f"--fold {args.fold}: nnU-Net's splits have folds 0 to {len(splits) - 1}")
    budget_s = trained["nnU-Net"]["seconds"]
    if args.autoseg_budget_s is not None:
        if not 0 < args.autoseg_budget_s <= budget_s:
            sys.exit(f"--autoseg-budget-s {args.autoseg_budget_s:g}: must be positive and at most nnU-Net's measured "
                     f"training time, {budget_s:.0f} s (a larger budget would flatter autoseg)")
        print(f"autoseg's budget: {args.autoseg_budget_s:.0f} s, not nnU-Net's measured {budget_s:.0f} s "
              "(--autoseg-budget-s)", flush=True)
        budget_s = args.autoseg_budget_s

    def prepare_autoseg():
        subprocess.run(autoseg_command("plan-and-preprocess", "-d", number, "-c", configuration, "-np", "2",
                                       f"--raw={folder / 'raw'}", f"--preprocessed={folder / 'pre'}"),
                       check=True, capture_output=True, env=child_env())
        (folder / "pre" / name / "splits.json").write_text(json.dumps(splits, indent=1))  # nnU-Net's folds
        return True

    work.step("autoseg plan-and-preprocess", prepare_autoseg)
    variants = {"autoseg": []} | ({"autoseg --fp32": ["--fp32"]} if args.also_fp32 else {})
    variants |= {f"autoseg --batch-size {batch}": ["--batch-size", str(batch)] for batch in args.also_batch}
    for label, extra in variants.items():
        trained[label] = work.step(f"train {label}", lambda: train_autoseg(folder, number, configuration, budget_s,
                                                                          folder_key(label), extra, args.fold,
                                                                          args.resumable, pause_at))
    images, labels = validation_inputs(folder, source, splits[args.fold]["val"])

    results = {}
    for label in trained:
        key = folder_key(label)
        predictions = folder / f"pred_{key}"

        def predict(label=label, predictions=predictions, key=key):
            # From nothing: autoseg skips cases already written, so a rerun after a session's end would time only
            # the rest (nnU-Net's predictor overwrites them all).
            shutil.rmtree(predictions, ignore_errors=True)
            if label == "nnU-Net":
                command = nnunet_command("nnUNetv2_predict", "-i", str(images), "-o", str(predictions), "-d", number,
                                         "-c", configuration, "-f", str(args.fold), "-tr", args.trainer, "-device",
                                         torch_device(),
                                         "-npp", "1", "-nps", "1")
                env = nnunet_env(folder)
            else:
                command = autoseg_command("predict", "-i", str(images), "-o", str(predictions), "-d", number, "-c",
                                          configuration, "-f", str(args.fold), f"--raw={folder / 'raw'}",
                                          f"--preprocessed={folder / 'pre'}", f"--results={folder / ('res_' + key)}")
                env = child_env()
            _, wall, _ = run_logged(command, env, folder / f"{key}_predict.log")
            return {"seconds": wall}

        if f"predict and evaluate {label}" in work.record:  # a working folder of an older version of this script
            results[label] = work.step(f"predict and evaluate {label}", None)
            continue
        # Two steps, so that an evaluation that fails (or a session that ends during it) does not redo the
        # prediction (ACDC's take 10 to 20 minutes a tool on the CPU).
        predicted = work.step(f"predict {label}", predict)
        results[label] = {**predicted, **work.step(f"evaluate {label}", lambda predictions=predictions: evaluate(
            folder, source, labels, predictions))}
    budget_said = (f"{budget_s:.0f} s (--autoseg-budget-s; nnU-Net measured {trained['nnU-Net']['seconds']:.0f} s)"
                   if args.autoseg_budget_s is not None else "nnU-Net's training time")
    print(f"\nnnU-Net's trainer: {args.trainer}{shortened}; autoseg's budget: {budget_said}")
    print_table(args.dataset, configuration, trained, results, len(splits[args.fold]["val"]), args.fold)


def folder_key(label: str) -> str:
    """A tool's label as a folder name: ``autoseg --fp32`` -> ``autoseg_fp32``, ``nnU-Net`` -> ``nnunet``."""
    return re.sub(r"\W+", "_", label.replace("nnU-Net", "nnunet"))


def print_table(dataset: str, configuration: str, trained: dict, results: dict, cases: int, fold: int = 0) -> None:
    classes = list(next(iter(results.values()))["per_class"])
    header = ["dataset", "configuration", "tool", "training s", "iterations", "batch"] + [f"Dice {c}" for c in classes] + \
        ["mean Dice", "HD95 mm", "NSD 1 mm", "predict s"]
    print(f"\nfold {fold}, {cases} validation cases, predicted with TTA; MONAI's Dice differs from autoseg evaluate's by "
          f"at most {max(r['monai_max_difference'] for r in results.values()):.1e}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for tool, result in results.items():
        row = [dataset, configuration, tool, f"{trained[tool]['seconds']:.0f}", str(trained[tool]["iterations"]),
               str(trained[tool].get("batch", "n/a"))]
        row += [f"{result['per_class'][c]['dice']:.4f}" for c in classes]
        mean = result["mean"]
        hd95 = _number(mean.get("hd95"))
        if result.get("hd95_undefined"):
            hd95 += f" ({result['hd95_undefined']} of {result['hd95_of']} undefined)"
        row += [f"{mean['dice']:.4f}", hd95, _number(mean.get("nsd")), f"{result['seconds']:.0f}"]
        print("| " + " | ".join(row) + " |")
    reference = results.get("nnU-Net")
    for tool, result in results.items():
        if reference and tool != "nnU-Net":
            print(f"{tool} - nnU-Net mean Dice: {result['mean']['dice'] - reference['mean']['dice']:+.4f}; "
                  f"training {speed_ratio(trained[tool], trained['nnU-Net'])}")


def speed_ratio(tool: dict, reference: dict) -> str:
    """Training speed against nnU-Net's: iterations per second where both trained at one batch, else
    images per second (an iteration of batch 2 is not one of batch 7); records of older runs lack the batch."""
    def per_second(run: dict, images: bool) -> float:
        return run["iterations"] * (run["batch"] if images else 1) / run["seconds"]

    if "batch" in tool and "batch" in reference and tool["batch"] != reference["batch"]:
        return (f"images per second ratio: {per_second(tool, True) / per_second(reference, True):.2f} "
                f"(batch {tool['batch']} against {reference['batch']})")
    return f"iterations per second ratio: {per_second(tool, False) / per_second(reference, False):.2f}"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
