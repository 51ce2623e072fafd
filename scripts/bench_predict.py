#!/usr/bin/env python3
"""Prediction speed of autoseg against nnU-Net v2 on the fold-0 validation cases of Hippocampus.

    python scripts/bench_predict.py [--cases 40] [--skip-nnunet]

Both tools get a model of the same topology and patch (3d_fullres, 40x56x40, 4 stages)
trained for a token number of iterations (speed does not depend on the weights), then
predict the same cases on the CPU with mirroring on, one fold, one process each; the
wall time of the prediction command alone is compared (target: autoseg <= 0.5x nnU-Net).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from scripts.bench_train import TRAINER  # noqa: E402


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode not in (0,):
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--skip-nnunet", action="store_true")
    args = parser.parse_args()
    name = "Dataset004_Hippocampus"
    source = SHARED / "data" / name
    if not source.is_dir():
        sys.exit(f"skipped: {source} is missing")
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    (work / "raw").mkdir()
    (work / "raw" / name).symlink_to(source)
    flags = [f"--raw={work / 'raw'}", f"--preprocessed={work / 'pre'}", f"--results={work / 'res'}"]
    env = dict(os.environ)
    subprocess.run(["autoseg", "plan-and-preprocess", "-d", name, "-c", "3d_fullres", "-a", "unet", *flags],
                   check=True, capture_output=True)
    subprocess.run(["autoseg", "train", name, "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "2",
                    "--val-iters", "1", "--no-validation", "--num-workers", "0", *flags], check=True, capture_output=True)
    import json

    val = json.loads((work / "pre" / name / "splits.json").read_text())[0]["val"][: args.cases]
    inputs = work / "inputs"
    inputs.mkdir()
    for case in val:
        shutil.copy(source / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    ours = timed(["autoseg", "predict", "-i", str(inputs), "-o", str(work / "out_autoseg"), "-d", name,
                  "-c", "3d_fullres", "-f", "0", "--device", "cpu", *flags], env)
    print(f"autoseg predict: {ours:.1f} s for {len(val)} cases (TTA on)", flush=True)
    if args.skip_nnunet:
        return
    venv = Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv"))
    if not (venv / "bin" / "nnUNetv2_predict").exists():
        print(f"nnU-Net: not installed at {venv}; no ratio")
        return
    site = next((venv / "lib").glob("python3*/site-packages/nnunetv2/training/nnUNetTrainer"))
    (site / "nnUNetTrainer_autosegBench.py").write_text(TRAINER.format(iters=2))
    nn_env = dict(env, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nn_pre"),
                  nnUNet_results=str(work / "nn_res"), PATH=f"{venv / 'bin'}:{env['PATH']}")
    number = str(int(re.match(r"Dataset(\d+)_", name).group(1)))
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", number, "-c", "3d_fullres", "-np", "2"], env=nn_env,
                   check=True, capture_output=True)
    subprocess.run(["nnUNetv2_train", number, "3d_fullres", "0", "-tr", "nnUNetTrainer_autosegBench", "-device", "cpu",
                    "--disable_checkpointing"], env=nn_env, capture_output=True)
    model = next((work / "nn_res" / name).glob("nnUNetTrainer_autosegBench__*"))
    fold = model / "fold_0"
    if not (fold / "checkpoint_final.pt").exists():
        sys.exit(f"nnU-Net wrote no checkpoint_final.pt in {fold}")
    theirs = timed(["nnUNetv2_predict", "-i", str(inputs), "-o", str(work / "out_nnunet"), "-d", number,
                    "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_autosegBench", "-device", "cpu",
                    "-npp", "1", "-nps", "1"], nn_env)
    print(f"nnU-Net predict: {theirs:.1f} s for {len(val)} cases (TTA on)")
    print(f"ratio autoseg / nnU-Net wall time: {ours / theirs:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
