"""The benchmark scripts' parsers, on output that the reference tools really printed, and the launcher that
shortens nnU-Net's epochs, on a stand-in for nnU-Net's trainer (nnunetv2 is not installed beside autoseg)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from autoseg.planning.plans import load_plans

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_accuracy import SHORTEN_EPOCHS, nnunet_command, parse_nnunet_log  # noqa: E402


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
