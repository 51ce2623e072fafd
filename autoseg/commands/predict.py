"""autoseg predict -i IN -o OUT -d DATASET [-c CONFIG] [-f FOLDS...]: label maps in the input's geometry."""

from __future__ import annotations

import sys

from autoseg.cli import add_common
from autoseg.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="predict a folder of images with a trained model")
    parser.add_argument("-i", "--input", required=True, help="folder of images (CASE_0000.nii.gz ...)")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default=None, help="default: the plan's default configuration")
    parser.add_argument("-a", "--architecture", default=None, help="default: the configuration's default")
    parser.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2", "3", "4"])
    parser.add_argument("--checkpoint", default=None, help="checkpoint file name (default: final, then best)")
    parser.add_argument("--step", type=float, default=0.5, help="window step as a fraction of the patch")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring (8x faster in 3D)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz")
    parser.add_argument("--overwrite", action="store_true", help="predict cases whose output exists")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    parser.add_argument("--windows-per-batch", type=int, default=4)
    add_common(parser)
    parser.set_defaults(func=run)


def select_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def run(args) -> int:
    from autoseg.inference.folder import predict_folder
    from autoseg.inference.model import load_trained_model
    from autoseg.inference.predictor import PredictionSettings
    from autoseg.paths import Roots
    from autoseg.planning.plans import load_plans

    if not 0 < args.step <= 1:
        raise UsageError("--step must be in (0, 1]")
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    name = roots.find_dataset(args.dataset)
    fallback = roots.plans_file(name) if roots.plans_file(name).exists() else None
    configuration = args.configuration or (load_plans(fallback).default_configuration if fallback else "3d_fullres")
    architecture = args.architecture or (load_plans(fallback).architecture(configuration).name if fallback else "unet")
    device = select_device(args.device)
    model_dir = roots.training_output(name, configuration, architecture, 0).parent
    model = load_trained_model(model_dir, args.folds, configuration, architecture, device, fallback, args.checkpoint)
    settings = PredictionSettings(step=args.step, mirror=not args.disable_tta,
                                  windows_per_batch=args.windows_per_batch, save_probabilities=args.save_probabilities)
    result = predict_folder(model, args.input, args.output, settings, device, overwrite=args.overwrite)
    print(f"predict: {len(result.written)} written, {len(result.skipped_existing)} already there, "
          f"{len(result.failed)} failed -> {args.output}")
    if result.failed:
        print(f"autoseg: error: {len(result.failed)} case(s) could not be predicted (see above)", file=sys.stderr)
        return 2
    return 0
