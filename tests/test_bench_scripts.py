"""The benchmark scripts' parsers, on output that the reference tools really printed, and the launcher that
shortens nnU-Net's epochs, on a stand-in for nnU-Net's trainer (nnunetv2 is not installed beside autoseg)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from autoseg.planning.plans import load_plans

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_accuracy import (AUTOSEG_EPOCH_REPORTED, EPOCH_PARTS, NNUNET_EPOCH_STARTED, SHORTEN_EPOCHS,  # noqa: E402
                            SPLIT_EPOCHS, Parts, Paused, nnunet_command, parse_nnunet_log, run_logged)


def test_nnunet_console_log_of_a_one_epoch_training_is_read():
    # nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainer_1epoch -device cpu (nnU-Net 2.8.1), as it printed it.
    log = parse_nnunet_log((REPO / "tests" / "data" / "nnunet_v2_1epoch_console.log").read_text())
    assert log.epochs == 1 and log.epoch_seconds == [2069.26]
    assert log.pseudo_dice == [0.7695, 0.7927]  # written as [np.float32(0.7695), np.float32(0.7927)]
    assert log.first_timestamp == datetime(2026, 12, 4, 2, 51, 18, 112555)
    assert log.done_timestamp == datetime(2026, 12, 4, 3, 25, 49, 113462)
    assert (log.done_timestamp - log.first_timestamp).total_seconds() > log.epoch_seconds[0]


# nnU-Net's trainer as far as the shortening launcher meets it: the constructor records its arguments by
# reading ``self.__init__``'s signature and its own locals (nnUNetTrainer.py of nnU-Net 2.8.1, lines 115-117),
# then sets the epoch's counts; a trainer variant calls it first and sets its own epochs.
FAKE_TRAINER = '''
import inspect
class nnUNetTrainer:
    def __init__(self, plans, configuration, fold, dataset_json, device="cpu"):
        self.my_init_kwargs = {}
        for k in inspect.signature(self.__init__).parameters.keys():
            self.my_init_kwargs[k] = locals()[k]
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch, self.num_epochs = 250, 50, 1000

class nnUNetTrainer_1epoch(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device="cpu"):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
'''
FAKE_ENTRY = '''
import sys
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer, nnUNetTrainer_1epoch
def run_training_entry():
    for trainer_class in (nnUNetTrainer_1epoch, nnUNetTrainer):
        trainer = trainer_class({}, "2d", 0, {})
        print(type(trainer).__name__, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
              trainer.num_epochs, sorted(trainer.my_init_kwargs), sys.argv[1:])
    return 0
'''


def test_shortened_nnunet_training_sets_the_epoch_counts_of_any_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("PEERS_VENV", str(tmp_path / "no-venv"))  # nnU-Net's entry point through this Python

    package = tmp_path / "nnunetv2"
    for folder, files in {package: {}, package / "training": {}, package / "training" / "nnUNetTrainer":
                          {"nnUNetTrainer.py": FAKE_TRAINER}, package / "run": {"run_training.py": FAKE_ENTRY}}.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
        for name, text in files.items():
            (folder / name).write_text(text)
    command = nnunet_command("nnUNetv2_train", "4", "2d", "0", prelude=SHORTEN_EPOCHS.format(iterations=40))
    result = subprocess.run(command, env={"PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, check=True)
    shortened = "bench_accuracy: epochs shortened to 40 iterations and 8 validation batches"
    arguments = "['configuration', 'dataset_json', 'device', 'fold', 'plans'] ['4', '2d', '0']"
    assert result.stdout.splitlines() == [
        shortened, f"nnUNetTrainer_1epoch 40 8 1 {arguments}",  # the variant keeps its own epochs
        shortened, f"nnUNetTrainer 40 8 1000 {arguments}"]  # the base class's signature survives the wrap


# nnU-Net's training loop as far as --resumable's split meets it (nnUNetTrainer.py of nnU-Net 2.8.1): initialize()
# builds the optimiser and PolyLRScheduler(optimizer, initial_lr, num_epochs) (lines 552-556), on_train_start
# initializes if needed (941-942), run_training calls it and then loops over range(current_epoch, num_epochs)
# (1417-1420), on_train_epoch_start steps the schedule to the epoch (1011), on_epoch_end saves checkpoint_latest
# when (epoch + 1) % save_every == 0 (1181); load_checkpoint (--c) initializes, then sets current_epoch (1220-1235).
SPLIT_FAKE_TRAINER = '''
class PolyLRScheduler:
    def __init__(self, optimizer, initial_lr, max_steps, exponent=0.9):
        self.optimizer, self.initial_lr, self.max_steps, self.exponent = optimizer, initial_lr, max_steps, exponent
    def step(self, current_step=None):
        self.optimizer["lr"] = self.initial_lr * (1 - current_step / self.max_steps) ** self.exponent

class nnUNetTrainer:
    def __init__(self, epochs=1000):
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch, self.num_epochs = 250, 50, epochs
        self.current_epoch, self.save_every, self.was_initialized, self.record = 0, 50, False, []
    def initialize(self):
        self.optimizer = {"lr": None}
        self.lr_scheduler = PolyLRScheduler(self.optimizer, 0.01, self.num_epochs)
        self.was_initialized = True
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
    def on_train_epoch_start(self):
        self.lr_scheduler.step(self.current_epoch)
    def run_training(self):
        self.on_train_start()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_train_epoch_start()
            self.record.append([epoch, self.optimizer["lr"], self.num_iterations_per_epoch,
                                self.num_val_iterations_per_epoch, (epoch + 1) % self.save_every == 0])
            self.current_epoch += 1
'''
SPLIT_FAKE_ENTRY = '''
import json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
def run_training_entry():
    runs = {}
    for name, epochs, resume_at in (("1 epoch", 1, None), ("5 epochs", 5, None), ("1 epoch, continued", 1, 20)):
        trainer = nnUNetTrainer(epochs)
        if resume_at is not None:  # as load_checkpoint does
            trainer.initialize()
            trainer.current_epoch = resume_at
        trainer.run_training()
        runs[name] = trainer.record
    print(json.dumps(runs))
    return 0
'''


def test_resumable_nnunet_training_runs_each_epoch_as_short_ones_at_its_learning_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("PEERS_VENV", str(tmp_path / "no-venv"))
    package = tmp_path / "nnunetv2"
    for folder, files in {package: {}, package / "training": {}, package / "training" / "nnUNetTrainer":
                          {"nnUNetTrainer.py": SPLIT_FAKE_TRAINER},
                          package / "run": {"run_training.py": SPLIT_FAKE_ENTRY}}.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
        for name, text in files.items():
            (folder / name).write_text(text)
    command = nnunet_command("nnUNetv2_train", "27", "3d_fullres", "0", prelude=SPLIT_EPOCHS.format(parts=EPOCH_PARTS))
    result = subprocess.run(command, env={"PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == ("bench_accuracy: 1 epoch(s) run as 25 of 10 iterations and 2 validation batches, "
                        "from epoch 0")
    runs = json.loads(lines[-1])
    one = runs["1 epoch"]
    # nnUNetTrainer_1epoch's 250 iterations and 50 validation batches, all at 1e-2, a checkpoint after each part.
    assert [epoch for epoch, *_ in one] == list(range(25)) and EPOCH_PARTS == 25
    assert sum(r[2] for r in one) == 250 and sum(r[3] for r in one) == 50
    assert all(r[1] == pytest.approx(0.01) and r[4] for r in one)
    # Five epochs: part e has the poly learning rate of epoch e // 25, the unsplit trainer's.
    five = runs["5 epochs"]
    assert len(five) == 125 and sum(r[2] for r in five) == 5 * 250
    assert [r[1] for r in five] == pytest.approx([0.01 * (1 - (e // 25) / 5) ** 0.9 for e in range(125)])
    # Continued at part 20 (nnUNetv2_train --c): the last five parts only.
    assert [r[0] for r in runs["1 epoch, continued"]] == [20, 21, 22, 23, 24]
    assert "from epoch 20" in lines[2]


def test_resumable_parts_count_each_stopped_part_until_its_last_checkpoint(tmp_path):
    import os

    checkpoint = tmp_path / "checkpoint_latest.pth"
    parts = Parts(tmp_path / "parts.json")
    parts.close_interrupted([checkpoint])  # nothing ran yet
    assert parts.parts == []
    assert parts.begin() == 0
    parts.parts[0]["start"] -= 3600  # the first part ran an hour ago, in an earlier session
    parts._save()
    first_start = parts.parts[0]["start"]
    checkpoint.write_bytes(b"")
    os.utime(checkpoint, (first_start + 600.0, first_start + 600.0))  # the last checkpoint, 10 minutes in
    again = Parts(tmp_path / "parts.json")  # the next session: the first part was stopped
    again.close_interrupted([checkpoint, tmp_path / "checkpoint_final.pth"])
    assert again.parts[0]["seconds"] == pytest.approx(600.0) and again.parts[0]["stopped"]
    again.begin()  # stopped again before its first checkpoint: counts nothing
    third = Parts(tmp_path / "parts.json")
    third.close_interrupted([checkpoint])
    assert third.parts[1]["seconds"] == 0.0
    third.begin()
    third.finish(1234.5)
    assert Parts(tmp_path / "parts.json").seconds == pytest.approx(600.0 + 1234.5)
    # Time that was not the tool's, taken out by hand (tests run beside a part), is not counted.
    edited = json.loads((tmp_path / "parts.json").read_text())
    edited[2].update(excluded_s=325.0, excluded_why="tests ran beside it")
    (tmp_path / "parts.json").write_text(json.dumps(edited))
    assert Parts(tmp_path / "parts.json").seconds == pytest.approx(600.0 + 1234.5 - 325.0)


def test_a_paused_training_part_stops_at_the_first_epoch_line_after_the_deadline(tmp_path):
    import re
    import time

    # The lines that mark an epoch's checkpoints as written, as each tool prints them.
    nnunet_lines = (REPO / "tests" / "data" / "nnunet_v2_1epoch_console.log").read_text().splitlines()
    assert [line for line in nnunet_lines if re.search(NNUNET_EPOCH_STARTED, line)] == \
        ["2026-12-04 02:51:18.780374: Epoch 0"]
    assert re.search(AUTOSEG_EPOCH_REPORTED, "epoch 3: train loss 0.7123, val loss 0.6644, pseudo Dice [0.1], "
                                             "EMA 0.1000, 41.2 s, lr 0.00912")
    printer = ("import time\nfor k in range(50):\n    print(f'epoch {k}: train loss 0.5', flush=True)\n"
               "    time.sleep(0.2)\n")
    started = time.time()
    with pytest.raises(Paused, match="after a checkpoint"):
        run_logged([sys.executable, "-c", printer], {"PATH": "/usr/bin:/bin"}, tmp_path / "part.log",
                   pause=(started + 0.5, AUTOSEG_EPOCH_REPORTED))
    printed = (tmp_path / "part.log").read_text().splitlines()
    assert 2 <= len(printed) <= 6 and time.time() - started < 5  # stopped at the first line past 0.5 s, not at 50


def test_bench_train_gives_autoseg_nnunets_batch_at_the_same_patch_and_refuses_another_patch(tmp_path):
    from bench_train import same_patch_and_batch

    plans_file = tmp_path / "pre" / "Dataset027_ACDC" / "plans.json"
    plans_file.parent.mkdir(parents=True)
    plans_file.write_text((REPO / "plans" / "Dataset027_ACDC.json").read_text())
    # nnU-Net v2's own ACDC 3d_fullres plan (nnUNetv2_plan_and_preprocess, nnUNetPlans.json): patch and batch.
    said = same_patch_and_batch(tmp_path, "Dataset027_ACDC", {"patch_size": [20, 256, 224], "batch_size": 4})
    assert said.startswith("batch 4 (nnU-Net's plan; autoseg's plans 3")
    plans = load_plans(plans_file)  # still a valid plans file, with only the batch changed
    assert plans.architecture("3d_fullres", "unet").batch_size == 4
    assert same_patch_and_batch(tmp_path, "Dataset027_ACDC", {"patch_size": [20, 256, 224], "batch_size": 4}) \
        == "batch 4 in both plans"
    with pytest.raises(SystemExit, match=r"not like for like: autoseg plans patch \[20, 256, 224\], nnU-Net"):
        same_patch_and_batch(tmp_path, "Dataset027_ACDC", {"patch_size": [16, 256, 224], "batch_size": 4})


def test_bench_accuracy_compares_images_per_second_when_the_batches_differ():
    from bench_accuracy import speed_ratio

    nnunet = {"seconds": 1046, "iterations": 250, "batch": 7}
    # 2249 x 2 images in 1021 s against 250 x 7 in 1046 s: 4.406 / 1.673 images per second
    assert speed_ratio({"seconds": 1021, "iterations": 2249, "batch": 2}, nnunet) == \
        "images per second ratio: 2.63 (batch 2 against 7)"
    # the same batch: iterations per second, 0.7 against 0.25
    assert speed_ratio({"seconds": 1000, "iterations": 700, "batch": 7}, {**nnunet, "seconds": 1000}) == \
        "iterations per second ratio: 2.80"
    assert speed_ratio({"seconds": 1000, "iterations": 700}, {**nnunet, "seconds": 1000}).endswith("2.80")


def test_bench_accuracy_table_says_how_many_hd95_values_were_undefined(capsys):
    # HD95 is left out of a class's mean where one side is empty: a tool missing a class in many cases would
    # show the HD95 of its easy cases only, so the table says how many of the case x class values it lacks.
    from bench_accuracy import print_table

    def result(dice: float, undefined: int) -> dict:
        per_class = {"RV": {"dice": dice}, "MLV": {"dice": dice}}
        return {"per_class": per_class, "mean": {"dice": dice, "hd95": 4.25, "nsd": 0.5}, "seconds": 60,
                "hd95_undefined": undefined, "hd95_of": 48, "monai_max_difference": 1e-8}

    trained = {"nnU-Net": {"seconds": 100, "iterations": 10, "batch": 4},
               "autoseg": {"seconds": 99, "iterations": 30, "batch": 2}}
    print_table("acdc", "3d_fullres", trained, {"nnU-Net": result(0.5, 17), "autoseg": result(0.75, 0)}, 24)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| acdc")]
    assert "| 0.5000 | 4.25 (17 of 48 undefined) | 0.50 | 60 |" in rows[0]
    assert "| 0.7500 | 4.25 | 0.50 | 60 |" in rows[1]


def test_bench_accuracy_keeps_one_fold_per_working_folder_and_refuses_a_batch_below_one(tmp_path):
    data = tmp_path / "data" / "Dataset004_Hippocampus"
    data.mkdir(parents=True)
    (data / "dataset.json").write_text("{}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "record.json").write_text('{"fold": 1, "train nnU-Net nnUNetTrainer_1epoch": {"seconds": 10}}')
    script = [sys.executable, str(REPO / "scripts" / "bench_accuracy.py"), "--data", str(tmp_path / "data"),
              "--work", str(work)]
    refused = subprocess.run(script, capture_output=True, text=True)
    assert refused.returncode != 0
    assert f"{work} holds fold 1's steps; give fold 0 a working folder of its own" in refused.stderr
    refused = subprocess.run([*script, "--fold", "1", "--also-batch", "0"], capture_output=True, text=True)
    assert refused.returncode != 0 and "--also-batch must be a positive number" in refused.stderr


def test_bench_accuracy_takes_a_smaller_autoseg_budget_but_never_a_larger_one(tmp_path):
    data = tmp_path / "data" / "Dataset004_Hippocampus"
    data.mkdir(parents=True)
    (data / "dataset.json").write_text("{}")
    work = tmp_path / "work"
    (work / "nn_pre" / "Dataset004_Hippocampus").mkdir(parents=True)
    (work / "nn_pre" / "Dataset004_Hippocampus" / "splits_final.json").write_text('[{"train": ["a"], "val": ["b"]}]')
    (work / "record.json").write_text('{"fold": 0, "train nnU-Net nnUNetTrainer_1epoch": {"seconds": 100.0}}')
    script = [sys.executable, str(REPO / "scripts" / "bench_accuracy.py"), "--data", str(tmp_path / "data"),
              "--work", str(work)]
    refused = subprocess.run([*script, "--autoseg-budget-s", "150"], capture_output=True, text=True)
    assert refused.returncode != 0
    assert "at most nnU-Net's measured training time, 100 s (a larger budget would flatter autoseg)" in refused.stderr


def test_bench_augmentation_times_autoseg_as_a_worker_on_one_core_and_nnunet_where_its_venv_is():
    # Each side as a child process pinned to one core; nnU-Net's draw comes from its own get_patch_size
    # (73x80x64 for Hippocampus' 40x56x40 patch, as nnU-Net 2.8.1's trainer logged it), not from ours.
    from tests.conftest import peers_python

    script = REPO / "scripts" / "bench_augmentation.py"
    child = [sys.executable, str(script), "--child", "autoseg", "--case", "0", "--batches", "1"]
    done = subprocess.run(child, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["drawn"] == [48, 68, 48] and len(result["times"]) == 1 and 0 < result["times"][0] < 30
    python = peers_python()
    if not python.exists():
        pytest.skip(f"{python} is missing: nnU-Net's side runs in the peers' environment (../shared/peers/setup.sh)")
    done = subprocess.run([str(python), *child[1:3], "nnunet", *child[4:]], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["drawn"] == [73, 80, 64]
