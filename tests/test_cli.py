import json
import subprocess
import sys

from autoseg.cli import main
from tests.conftest import shared_dataset


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "autoseg", "demo", "-o", str(tmp_path / "demo"), "--cases", "6",
                             "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no problems found" in result.stdout and "demo: done" in result.stdout
    plans = json.loads((tmp_path / "demo" / "preprocessed" / "Dataset999_Synthetic" / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [3.0, 1.0, 1.0]
    # Run again with fewer cases: its own model predicts (nothing "already there"), evaluated on its own test cases.
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "predictions").glob("*.nii.gz")}
    again = subprocess.run([sys.executable, "-m", "autoseg", "demo", "-o", str(tmp_path / "demo"), "--cases", "5",
                            "--quick"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "predict: 2 written, 0 already there" in again.stdout
    raw = tmp_path / "demo" / "raw" / "Dataset999_Synthetic"
    assert len(list((raw / "imagesTr").iterdir())) == 5
    predictions = sorted(p.name for p in (tmp_path / "demo" / "predictions").glob("*.nii.gz"))
    assert predictions == sorted(p.name for p in (raw / "labelsTs").iterdir()) and predictions != sorted(first)


def test_hippocampus_plan_and_preprocess_from_the_command_line(tmp_path, capsys):
    raw = shared_dataset("Dataset004_Hippocampus")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / raw.name).symlink_to(raw)
    # -a unet: the plan of every architecture is test_planner's (the committed plans); this is the command's path
    code = main(["plan-and-preprocess", "-d", "4", "-c", "3d_fullres", "-a", "unet", f"--raw={tmp_path / 'raw'}",
                 f"--preprocessed={tmp_path / 'pre'}", f"--results={tmp_path / 'res'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "3d_fullres  spacing 1x1x1  patch 40x56x40  batch 7  stages 4" in out
    folder = next((tmp_path / "pre" / raw.name).glob("3d_fullres_*"))
    assert len(list(folder.glob("*_seg.npy"))) == 200


def test_unknown_dataset_and_bad_usage_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    assert main(["check", "-d", "17", f"--raw={tmp_path}", f"--preprocessed={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no dataset with id 17" in err and "Traceback" not in err
    result = subprocess.run([sys.executable, "-m", "autoseg", "plan-and-preprocess"], capture_output=True, text=True)
    assert result.returncode == 2 and "required" in result.stderr
    for command in (["train", "17", "3d_fullres", "0"], ["pretrain", "-d", "17", "-c", "3d_fullres"]):
        assert main([*command, "--fp32", "--cpu-bf16", f"--raw={tmp_path}"]) == 2
        assert "--fp32 and --cpu-bf16 contradict each other" in capsys.readouterr().err, command
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's: every rank would write the same validation folder
    assert main(["train", "17", "3d_fullres", "0", "--validation-only", f"--raw={tmp_path}"]) == 2
    assert "--validation-only runs in one process" in capsys.readouterr().err


def test_summary_lists_every_planned_architecture_with_flops(synthetic_raw, tmp_path, capsys):
    code = main(["plan-and-preprocess", "-d", "999", "--no-preprocess", "--summary", f"--raw={synthetic_raw.parent}",
                 f"--preprocessed={tmp_path / 'pre'}", f"--results={tmp_path / 'res'}"])
    assert code == 0
    plans = json.loads((tmp_path / "pre" / synthetic_raw.name / "plans.json").read_text())
    lines = capsys.readouterr().out.splitlines()
    for config_name, config in plans["configurations"].items():
        for arch_name, arch in config["architectures"].items():
            row = next(line.split() for line in lines if line.split()[:2] == [config_name, arch_name])
            patch, batch, params, gflops, memory = row[2:7]
            assert patch == "x".join(map(str, arch["patch_size"])) and int(batch) == arch["batch_size"]
            assert float(params) == round(arch["num_parameters"] / 1e6, 2)
            assert float(gflops) > 0 and float(memory) == round(arch["estimated_memory_gb"], 2)
