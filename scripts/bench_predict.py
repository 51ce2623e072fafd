#!/usr/bin/env python3
"""Prediction speed and Dice of autoseg against nnU-Net v2, same weights, on fold-0 validation cases.

    python scripts/bench_predict.py [--dataset hippocampus|acdc] [--cases N] [--iters N] [--skip-nnunet] [--work DIR]

``--dataset acdc`` (Dataset027_ACDC, 3d_fullres 20x256x224, 6 stages; 24 validation cases,
25 training iterations by default: an ACDC step takes seconds) instead of Hippocampus.

autoseg plans and trains 3d_fullres fold 0 for a short schedule (``--iters``, bf16 on the
CPU; enough for a Dice worth comparing). nnU-Net plans the same dataset (its plan has the
same topology and patch: 40x56x40, 4 stages 32-256), and autoseg's weights are copied
into nnU-Net's ``PlainConvUNet``, layer by layer (conv biases, which instance
normalisation cancels and autoseg's network does not have, are zero); the copy is checked
by running both networks on one random patch. Then both tools predict the same cases on
the CPU with mirroring on, one fold, nnU-Net with one process each for preprocessing and
export (``../shared/peers/nnunet.sh``'s setting). Printed: the wall time of each
prediction command (target: autoseg <= 0.4x nnU-Net) and the mean Dice of each output
evaluated by the same code (target: equal within 0.005).

``--work DIR`` keeps the working folder and, run again, reuses its trained model.
nnU-Net comes from the peers environment (``../shared/peers/setup.sh``; ``PEERS_VENV``,
default ``/tmp/peers-venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child_env import child_env

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

# --dataset: (folder, nnU-Net's dataset id, default validation cases, default training iterations)
DATASETS = {"hippocampus": ("Dataset004_Hippocampus", "4", 40, 100), "acdc": ("Dataset027_ACDC", "27", 24, 25)}
NNUNET_MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"

# Run with the peers environment's python: builds nnU-Net's network from its plan, copies
# autoseg's weights into it, checks the copy on one patch and writes nnU-Net's checkpoint.
COPY_WEIGHTS = r'''
import re, sys
import numpy as np, torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

autoseg_checkpoint, plans_file, dataset_file, check_file, output = sys.argv[1:6]
plans, dataset = load_json(plans_file), load_json(dataset_file)
manager = PlansManager(plans)
config = manager.get_configuration("3d_fullres")
heads = manager.get_label_manager(dataset).num_segmentation_heads
network = nnUNetTrainer.build_network_architecture(plans_manager=manager, configuration_manager=config,
    num_input_channels=1, num_output_channels=heads, enable_deep_supervision=False)
source = torch.load(autoseg_checkpoint, map_location="cpu", weights_only=True)["model"]
stages = len(network.encoder.stages)
last_head = len(network.decoder.seg_layers) - 1

def stage(s):
    return "net.input_block" if s == 0 else "net.bottleneck" if s == stages - 1 else f"net.downsamples.{s - 1}"

def autoseg_name(key):
    key = re.sub(r"^decoder\.encoder\.", "encoder.", key)
    key = key.replace("all_modules.0", "conv").replace("all_modules.1", "norm")
    m = re.match(r"encoder\.stages\.(\d+)\.(?:0\.)?convs\.(\d+)\.(conv|norm)\.(weight|bias)$", key)
    if m:
        s, c, kind, what = int(m[1]), int(m[2]) + 1, m[3], m[4]
        return f"{stage(s)}.conv{c}.conv.weight" if kind == "conv" and what == "weight" else \
            None if kind == "conv" else f"{stage(s)}.norm{c}.{what}"
    m = re.match(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$", key)
    if m:
        j, c, kind, what = int(m[1]), int(m[2]) + 1, m[3], m[4]
        block = f"net.upsamples.{j}.conv_block"
        return f"{block}.conv{c}.conv.weight" if kind == "conv" and what == "weight" else \
            None if kind == "conv" else f"{block}.norm{c}.{what}"
    m = re.match(r"decoder\.transpconvs\.(\d+)\.(weight|bias)$", key)
    if m:
        return f"net.upsamples.{m[1]}.transp_conv.conv.weight" if m[2] == "weight" else None
    m = re.match(r"decoder\.seg_layers\.(\d+)\.(weight|bias)$", key)
    if m:
        return f"net.output_block.conv.conv.{m[2]}" if int(m[1]) == last_head else None
    raise SystemExit(f"no autoseg counterpart for nnU-Net parameter {key}")

weights = {}
for key, value in network.state_dict().items():
    name = autoseg_name(key)
    weights[key] = torch.zeros_like(value) if name is None else source[name]  # None: a bias autoseg lacks, or an unused head
    assert weights[key].shape == value.shape, (key, name, weights[key].shape, value.shape)
network.load_state_dict(weights)
network.eval()
check = np.load(check_file)
with torch.no_grad():
    out = network(torch.from_numpy(check["x"])).numpy()
print(f"weights copied: largest logit difference on a random patch {np.abs(out - check['y']).max():.2e}")
torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                          "device": "cpu"},
            "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 1, "optimizer_state": None,
            "grad_scaler_state": None, "logging": {}, "_best_ema": None}, output)
'''


def run(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def mean_dice(references: Path, predictions: Path, labels: dict) -> tuple[float, dict]:
    from autoseg.evaluation.evaluate import evaluate_folder

    summary = evaluate_folder(references, predictions, labels, ".nii.gz", num_processes=1, progress=False)
    return summary.mean_foreground["dice"], {k: round(v.mean["dice"], 4) for k, v in summary.per_class.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="hippocampus")
    parser.add_argument("--cases", type=int, help="validation cases to predict (default: 40, ACDC 24: all of fold 0)")
    parser.add_argument("--iters", type=int, help="autoseg training iterations, epochs of 25 (default 100, ACDC 25)")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="autoseg predicts in float32 (default: bf16 where native)")
    parser.add_argument("--work", type=Path, help="working folder to keep (and reuse the trained model from)")
    args = parser.parse_args()
    name, dataset_id, default_cases, default_iters = DATASETS[args.dataset]
    args.cases, args.iters = args.cases or default_cases, args.iters or default_iters
    source = SHARED / "data" / name
    if not source.is_dir():
        sys.exit(f"skipped: {source} is missing")
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench_predict_"))
    (work / "raw").mkdir(parents=True, exist_ok=True)
    if not (work / "raw" / name).exists():
        (work / "raw" / name).symlink_to(source)
    for old in ("inputs", "references", "out_autoseg", "out_nnunet", "nn_res"):
        shutil.rmtree(work / old, ignore_errors=True)
    flags = [f"--raw={work / 'raw'}", f"--preprocessed={work / 'pre'}", f"--results={work / 'res'}"]
    autoseg = [sys.executable, "-m", "autoseg"]
    env = child_env()
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    fold = work / "res" / name / "3d_fullres__unet" / "fold_0"
    if not (fold / "checkpoint_final.pt").is_file():
        run([*autoseg, "plan-and-preprocess", "-d", name, "-c", "3d_fullres", "-a", "unet", *flags], env)
        epochs = max(1, args.iters // 25)
        seconds = run([*autoseg, "train", name, "3d_fullres", "0", "--epochs", str(epochs), "--iters-per-epoch",
                       str(min(25, args.iters)), "--val-iters", "1", "--no-validation", "--cpu-bf16", "--seed", "0",
                       "--device", "cpu", *flags], env)
        print(f"autoseg trained fold 0 for {epochs * min(25, args.iters)} iterations in {seconds:.0f} s", flush=True)

    val = json.loads((work / "pre" / name / "splits.json").read_text())[0]["val"][: args.cases]
    inputs, references = work / "inputs", work / "references"
    inputs.mkdir()
    references.mkdir()
    for case in val:
        shutil.copy(source / "imagesTr" / f"{case}_0000.nii.gz", inputs)
        shutil.copy(source / "labelsTr" / f"{case}.nii.gz", references)
    labels = json.loads((source / "dataset.json").read_text())["labels"]
    ours = run([*autoseg, "predict", "-i", str(inputs), "-o", str(work / "out_autoseg"), "-d", name,
                "-c", "3d_fullres", "-a", "unet", "-f", "0", "--device", "cpu", "--no-postprocessing",
                *(["--fp32"] if args.fp32 else []), *flags], env)
    our_dice, our_classes = mean_dice(references, work / "out_autoseg", labels)
    print(f"autoseg predict: {ours:.1f} s for {len(val)} cases (TTA on); mean Dice {our_dice:.4f} {our_classes}",
          flush=True)
    if args.skip_nnunet:
        return

    venv = Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv"))
    if not (venv / "bin" / "nnUNetv2_predict").exists():
        print(f"nnU-Net: not installed at {venv} (run ../shared/peers/setup.sh); no ratio")
        return
    import torch

    from autoseg.inference.model import find_checkpoint, load_trained_model

    model = load_trained_model(fold.parent, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    patch = model.plans.architecture("3d_fullres", "unet").patch_size
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model.networks[0](x)
    np.savez(work / "check.npz", x=x.numpy(), y=y.numpy())

    nn_env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nn_pre"),
                  nnUNet_results=str(work / "nn_res"), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "2", "--no_pp"], nn_env)
    nn_plans = work / "nn_pre" / name / "nnUNetPlans.json"
    nn_model = work / "nn_res" / name / NNUNET_MODEL
    (nn_model / "fold_0").mkdir(parents=True)
    shutil.copy(nn_plans, nn_model / "plans.json")
    shutil.copy(source / "dataset.json", nn_model / "dataset.json")
    copy = subprocess.run([str(venv / "bin" / "python"), "-c", COPY_WEIGHTS, str(find_checkpoint(fold)),
                           str(nn_plans), str(source / "dataset.json"), str(work / "check.npz"),
                           str(nn_model / "fold_0" / "checkpoint_final.pth")], capture_output=True, text=True)
    if copy.returncode != 0:
        sys.exit(f"copying the weights into nnU-Net's network failed:\n{copy.stderr[-3000:]}")
    print(copy.stdout.strip())
    theirs = run(["nnUNetv2_predict", "-i", str(inputs), "-o", str(work / "out_nnunet"), "-d", dataset_id, "-c", "3d_fullres",
                  "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], nn_env)
    their_dice, their_classes = mean_dice(references, work / "out_nnunet", labels)
    print(f"nnU-Net predict: {theirs:.1f} s for {len(val)} cases (TTA on); mean Dice {their_dice:.4f} {their_classes}")
    # Where both models are barely trained (ACDC's default), both Dices are small: how far the two label maps
    # agree with each other says more about whether they are the same prediction.
    agreement, agreement_classes = mean_dice(work / "out_nnunet", work / "out_autoseg", labels)
    print(f"autoseg's label maps against nnU-Net's: mean Dice {agreement:.4f} {agreement_classes}")
    print(f"ratio autoseg / nnU-Net wall time: {ours / theirs:.2f} (target <= 0.4); "
          f"Dice difference {our_dice - their_dice:+.4f} (target within 0.005); "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
