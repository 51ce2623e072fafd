"""Cluster scale: predict --part K/N, and training across two torchrun nodes on localhost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.inference.folder import InputCase, select_part
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def test_parts_cover_every_case_exactly_once_in_order():
    for count_cases in (0, 1, 7, 40, 41):
        cases = [InputCase(f"case_{i:03d}", [], ".nii.gz") for i in range(count_cases)]
        for parts in (1, 3, 4, 50):
            pieces = [select_part(cases, (k, parts)) for k in range(1, parts + 1)]
            assert [c for piece in pieces for c in piece] == cases
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_part_must_be_k_of_n(tmp_path, capsys):
    for bad in ("0/4", "5/4", "a/b", "3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", "x.zip", "--part", bad])
        assert exit_info.value.code == 2 and "K/N" in capsys.readouterr().err


@pytest.mark.slow
def test_parts_write_the_bytes_of_one_run_and_a_requeued_part_writes_nothing(pipeline, tmp_path, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(pipeline.dataset / "imagesTs", inputs)
    for image in sorted((pipeline.dataset / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(image, inputs)
    flags = ["-d", "999", "-c", "3d_fullres", "-f", "0", "--disable-tta", *pipeline.flags]
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "whole"), *flags]) == 0
    capsys.readouterr()
    written = []
    for part in range(1, 4):
        assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "parts"), "--part", f"{part}/3", *flags]) == 0
        written.append(int(capsys.readouterr().out.split("predict: ")[1].split()[0]))
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len(whole) == 8 and written == [2, 3, 3]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == whole
    for name in whole:
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "parts"), "--part", "2/3", *flags]) == 0
    assert "0 written, 3 already there" in capsys.readouterr().out


@pytest.mark.slow
def test_two_torchrun_nodes_on_localhost_train_two_iterations_together(pipeline, tmp_path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    train = ["-m", "autoseg", "train", "999", "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "2",
             "--val-iters", "1", "--num-workers", "0", "--no-validation", "--seed", "1",
             f"--raw={pipeline.raw}", f"--preprocessed={pipeline.pre}", f"--results={tmp_path / 'res'}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *train],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].count("train: done") == 1 and "train: done" not in outputs[1][0], "only global rank 0 reports"
    fold = tmp_path / "res" / pipeline.name / "3d_fullres__unet" / "fold_0"
    content = torch.load(fold / "checkpoint_final.pt", weights_only=True)
    assert len(content["rng_per_rank"]) == 2, "both nodes took part"
    log = [json.loads(line) for line in (fold / "training_log.jsonl").read_text().splitlines()]
    assert content["epoch"] == 1 and content["scheduler"]["iters_per_epoch"] == 2 and len(log) == 1
