#!/usr/bin/env python3
"""Model packages on Hippocampus fold-0 validation cases: Segmenter vs one CLI call per case,
onnxruntime vs torch, and --part against one run.

    python scripts/bench_package.py --model-dir RESULTS/Dataset004_Hippocampus/3d_fullres__unet \
        --preprocessed PRE [--cases 40] [--work DIR]

The model is any trained fold 0 of the 3d_fullres U-Net (``autoseg train 4 3d_fullres 0``);
its validation cases are read from ``splits.json``. Printed, all in one run on this machine:

1. ``Segmenter``: the model loaded once (package verified and unpacked once), then
   ``predict(path)`` + ``sitk.WriteImage`` per case, against one ``python -m autoseg predict
   -m PACKAGE`` process per case (interpreter start, imports, verification, loading, reading,
   prediction, writing: what a script calling the command per scan pays). Mirroring on
   (unless ``--disable-tta``), bf16 where native, for both. Voxel identity of every output is checked.
2. ONNX: the largest |logit| difference between the torch network (float32) and
   onnxruntime on every window of every case, and the wall time and mean Dice of ``predict
   --engine onnxruntime`` against ``--engine torch`` in float32 and in bf16 (one process each,
   all cases in one folder).
3. ``--part``: four ``--part K/4`` runs against one run (no mirroring), compared byte for byte.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RAW = REPO.parent / "shared" / "data" / "Dataset004_Hippocampus"


def autoseg(*arguments: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoseg", *arguments], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    return time.perf_counter() - start


def mean_dice(predictions: Path) -> float:
    from autoseg.evaluation.evaluate import evaluate_folder

    labels = json.loads((RAW / "dataset.json").read_text())["labels"]
    references = predictions.parent / f"{predictions.name}_references"
    references.mkdir(exist_ok=True)
    for file in predictions.glob("*.nii.gz"):
        shutil.copy(RAW / "labelsTr" / file.name, references / file.name)
    summary = evaluate_folder(references, predictions, labels, ".nii.gz", num_processes=1, progress=False)
    return float(np.mean([c.mean["dice"] for c in summary.per_class.values()]))


def same_voxels(a: Path, b: Path) -> bool:
    import SimpleITK as sitk

    return all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(b / f.name)))) for f in sorted(a.glob("*.nii.gz")))


def largest_logit_difference(package: Path, inputs: Path) -> float:
    """max |torch fp32 logits - onnxruntime logits| over every window of every case."""
    import torch

    from autoseg.inference.folder import _read, list_input_cases
    from autoseg.inference.package import load_package_models, opened_package
    from autoseg.inference.sliding_window import predict_probabilities
    from autoseg.preprocessing.preprocess import preprocess_arrays

    with opened_package(package) as (folder, manifest):
        torch_model = load_package_models(folder, manifest, torch.device("cpu"))[0][0]
        onnx_model = load_package_models(folder, manifest, torch.device("cpu"), engine="onnxruntime")[0][0]
    largest = [0.0]

    def compare(x):
        reference = torch_model.networks[0](x)
        largest[0] = max(largest[0], float((reference - onnx_model.networks[0](x)).abs().max()))
        return reference

    arch = torch_model.plans.architecture("3d_fullres")
    for case in list_input_cases(inputs, 1):
        image, geometry = _read(case, 1)
        pre = preprocess_arrays(image, None, geometry, torch_model.plans, "3d_fullres")
        predict_probabilities([compare], torch.from_numpy(pre.image), arch.patch_size, mirror=False, images_per_call=8)
    return largest[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--preprocessed", type=Path, required=True, help="the preprocessed root (for splits.json)")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring in 1 and 2 (8x less network time)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure appears when measured
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_package_"))
    work.mkdir(parents=True, exist_ok=True)
    splits = json.loads((args.preprocessed / "Dataset004_Hippocampus" / "splits.json").read_text())
    cases = sorted(splits[0]["val"])[: args.cases]
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    for case in cases:
        shutil.copy(RAW / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    results = args.model_dir.parent.parent
    package = work / "hippocampus.zip"
    autoseg("export", "-d", "Dataset004_Hippocampus", "-c", "3d_fullres", "-f", "0", "--onnx", "-o", str(package),
            f"--results={results}", f"--raw={RAW.parent}")
    print(f"{len(cases)} validation cases of fold 0; package {package.stat().st_size / 2**20:.1f} MB")

    # 1. Segmenter against one command per case.
    for folder in ("cli", "api"):
        shutil.rmtree(work / folder, ignore_errors=True)
    tta = ["--disable-tta"] if args.disable_tta else []
    cli_seconds = 0.0
    for case in cases:
        single = work / "single" / case
        single.mkdir(parents=True, exist_ok=True)
        shutil.copy(inputs / f"{case}_0000.nii.gz", single)
        cli_seconds += autoseg("predict", "-m", str(package), "-i", str(single), "-o", str(work / "cli"), *tta)
    import SimpleITK as sitk

    from autoseg import Segmenter

    start = time.perf_counter()
    segmenter = Segmenter.load(package, device="cpu", tta=not args.disable_tta)
    (work / "api").mkdir()
    for case in cases:
        sitk.WriteImage(segmenter.predict(inputs / f"{case}_0000.nii.gz"), str(work / "api" / f"{case}.nii.gz"))
    api_seconds = time.perf_counter() - start
    print(f"Segmenter (loaded once): {api_seconds:.1f} s, {api_seconds / len(cases):.2f} s/case; one `autoseg predict` "
          f"per case: {cli_seconds:.1f} s, {cli_seconds / len(cases):.2f} s/case; ratio {api_seconds / cli_seconds:.2f} "
          f"({100 * (1 - api_seconds / cli_seconds):.0f}% faster); voxel-identical: {same_voxels(work / 'cli', work / 'api')}")

    # 2. onnxruntime against torch.
    print(f"largest |logit| difference torch fp32 vs onnxruntime over all windows: "
          f"{largest_logit_difference(package, inputs):.2e}")
    timings = {}
    for label, extra in (("torch bf16", []), ("torch fp32", ["--fp32"]), ("onnxruntime fp32", ["--engine", "onnxruntime"])):
        out = work / label.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        seconds = autoseg("predict", "-m", str(package), "-i", str(inputs), "-o", str(out), *extra, *tta)
        timings[label] = seconds
        print(f"{label:18s} {seconds:7.1f} s  mean Dice {mean_dice(out):.4f}")
    print(f"onnxruntime / torch fp32: {timings['onnxruntime fp32'] / timings['torch fp32']:.2f}; "
          f"onnxruntime / torch bf16: {timings['onnxruntime fp32'] / timings['torch bf16']:.2f}")

    # 3. --part.
    for folder in ("whole", "parts"):
        shutil.rmtree(work / folder, ignore_errors=True)
    autoseg("predict", "-m", str(package), "-i", str(inputs), "-o", str(work / "whole"), "--disable-tta")
    for part in range(1, 5):
        autoseg("predict", "-m", str(package), "-i", str(inputs), "-o", str(work / "parts"), "--disable-tta",
                "--part", f"{part}/4")
    whole = sorted(p.name for p in (work / "whole").iterdir())
    identical = whole == sorted(p.name for p in (work / "parts").iterdir()) and all(
        (work / "whole" / n).read_bytes() == (work / "parts" / n).read_bytes() for n in whole)
    print(f"--part 1/4 .. 4/4: {len(whole)} files, byte-identical to one run: {identical}")


if __name__ == "__main__":
    main()
