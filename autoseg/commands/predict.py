"""autoseg predict -i IN -o OUT (-m PACKAGE | -d DATASET [-c CONFIG...] [-a ARCH...]) [-f FOLDS...]: label maps.

``-m`` takes a package written by ``autoseg export`` (a zip or its unpacked folder), which
is verified member by member before anything is loaded; no dataset or roots are needed.
``--part K/N`` predicts the K-th of N parts of the sorted cases (a job array).

Several configurations or architectures (``-c 2d 3d_fullres``, ``-a unet resenc_unet``; a
single value goes with every value of the other) are predicted as one ensemble. The
postprocessing chosen on the cross-validation (``postprocessing.json`` beside the model,
or in ``ensembles/`` for an ensemble) is applied unless ``--no-postprocessing``.
"""

from __future__ import annotations

import sys

from autoseg.cli import add_common
from autoseg.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="predict a folder of images with a trained model")
    parser.add_argument("-i", "--input", required=True, help="folder of images (CASE_0000.nii.gz ...)")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("-m", "--model", help="a model package (autoseg export): a zip or its unpacked folder")
    parser.add_argument("-d", "--dataset", help="the dataset whose trained model to use (when no -m)")
    parser.add_argument("-c", "--configuration", nargs="+", default=None,
                        help="default: the plan's default configuration; several: an ensemble")
    parser.add_argument("-a", "--architecture", nargs="+", default=None,
                        help="default: the configuration's default; several: an ensemble")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="default: 0 1 2 3 4, or with -m every fold in the package")
    parser.add_argument("--part", type=parse_part, default=None, metavar="K/N",
                        help="only the K-th of N parts of the sorted cases (1 <= K <= N), e.g. a job array's task")
    parser.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                        help="onnxruntime: the package's ONNX networks (export --onnx), float32 on the CPU")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file name, e.g. checkpoint_best.pt of a fold still training "
                             "(default: checkpoint_final.pt: finished folds only)")
    parser.add_argument("--step", type=float, default=0.5, help="window step as a fraction of the patch")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring (8x faster in 3D)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz")
    parser.add_argument("--overwrite", action="store_true", help="predict cases whose output exists")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="do not apply the postprocessing chosen on the cross-validation")
    parser.add_argument("--output-format", default="nifti", choices=["nifti", "dicom-seg", "both"],
                        help="DICOM input: also (both) or only (dicom-seg) a DICOM SEG per case, CASE.dcm")
    parser.add_argument("--dicom-channels", nargs="+", default=None, metavar="PATTERN",
                        help="DICOM input to a multi-channel model: one SeriesDescription pattern per channel "
                        "(case-insensitive glob, e.g. '*T1*' '*FLAIR*'), matched within each study")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    parser.add_argument("--windows-per-batch", type=int, default=None,
                        help="network inputs per call, windows x mirror flips (default: 4 on a GPU; on the CPU as "
                        "many as fit 128k voxels, one 40x56x40 window)")
    parser.add_argument("--fp32", action="store_true",
                        help="compute in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    add_common(parser)
    parser.set_defaults(func=run)


def select_device(name: str):
    from autoseg.training.distributed import select_device as training_device

    return training_device(name)


def run(args) -> int:
    from autoseg.inference.folder import predict_folder
    from autoseg.inference.model import load_trained_model
    from autoseg.inference.predictor import PredictionSettings
    from autoseg.paths import Roots

    if not 0 < args.step <= 1:
        raise UsageError("--step must be in (0, 1]")
    if args.windows_per_batch is not None and args.windows_per_batch < 1:
        raise UsageError("--windows-per-batch must be at least 1")
    device = select_device(args.device)
    if args.model:
        from autoseg.inference.package import load_package_models, opened_package

        if args.dataset or args.configuration or args.architecture or args.checkpoint:
            raise UsageError("-m names the model: leave out -d, -c, -a and --checkpoint")
        with opened_package(args.model) as (folder, manifest):
            models, postprocessing = load_package_models(folder, manifest, device, args.folds, args.engine)
        postprocessing = None if args.no_postprocessing else postprocessing
        print(f"postprocessing: {postprocessing.describe() if postprocessing else 'none'} (from the package)")
    else:
        if not args.dataset:
            raise UsageError("give the model: -m PACKAGE, or -d DATASET (with -c/-a/-f)")
        if args.engine != "torch":
            raise UsageError("--engine onnxruntime runs a package's ONNX networks: give -m PACKAGE")
        roots = Roots.resolve(args.raw, args.preprocessed, args.results)
        name = roots.find_dataset(args.dataset)
        fallback = roots.plans_file(name) if roots.plans_file(name).exists() else None
        models = [load_trained_model(roots.training_output(name, configuration, architecture, 0).parent,
                                     args.folds or ["0", "1", "2", "3", "4"], configuration, architecture, device,
                                     fallback, args.checkpoint)
                  for configuration, architecture in planned_models(roots, name, args.configuration, args.architecture)]
        postprocessing = None if args.no_postprocessing else find_postprocessing(roots, name, models)
    settings = PredictionSettings(step=args.step, mirror=not args.disable_tta, windows_per_batch=args.windows_per_batch,
                                  amp=not args.fp32 and args.engine == "torch",
                                  save_probabilities=args.save_probabilities)
    result = predict_folder(models[0] if len(models) == 1 else models, args.input, args.output, settings, device,
                            overwrite=args.overwrite, postprocessing=postprocessing, part=args.part,
                            output_format=args.output_format, dicom_channels=args.dicom_channels)
    print(f"predict: {len(result.written)} written, {len(result.skipped_existing)} already there, "
          f"{len(result.failed)} failed -> {args.output}")
    if result.failed:
        print(f"autoseg: error: {len(result.failed)} case(s) could not be predicted (see above)", file=sys.stderr)
        return 2
    return 0


def parse_part(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N), 1 <= K <= N."""
    import argparse

    part, _, count = text.partition("/")
    if not (part.isdigit() and count.isdigit() and 1 <= int(part) <= int(count)):
        raise argparse.ArgumentTypeError(f"'{text}' is not K/N with 1 <= K <= N (e.g. --part 3/50)")
    return int(part), int(count)


def planned_models(roots, dataset_name: str, configurations: list[str] | None,
                   architectures: list[str] | None) -> list[tuple[str, str]]:
    """(configuration, architecture) of each model asked for; what is not given is the plan's default."""
    from autoseg.planning.plans import load_plans

    plans = load_plans(roots.plans_file(dataset_name)) if roots.plans_file(dataset_name).exists() else None
    pairs = model_pairs(configurations, architectures)
    if plans is None and any(c is None or a is None for c, a in pairs):
        # No plan to name the default (a machine holding only the results): the one trained model, never a guess.
        from autoseg.inference.ensemble import model_name, split_model_name

        trained = []
        for folder in sorted((roots.results / dataset_name).glob("*__*")):
            try:
                trained += [split_model_name(folder.name)] if folder.is_dir() else []
            except UsageError:  # "__old" and the like: not a model folder
                continue
        models = []
        for wanted_configuration, wanted_architecture in pairs:
            fitting = [(c, a) for c, a in trained
                       if wanted_configuration in (None, c) and wanted_architecture in (None, a)]
            if len(fitting) != 1:
                raise UsageError(f"no plans.json to name the default model, and {len(fitting)} trained model(s) "
                                 f"fit ({', '.join(model_name(*m) for m in fitting) or 'none'}): give -c and -a",
                                 roots.plans_file(dataset_name))
            models += fitting
        return models
    models = []
    for configuration, architecture in pairs:
        configuration = configuration or plans.default_configuration
        models.append((configuration, architecture or plans.architecture(configuration).name))
    return models


def model_pairs(configurations: list[str] | None, architectures: list[str] | None) -> list[tuple[str | None, str | None]]:
    """(configuration, architecture) of each ensemble member; a single value pairs with every other."""
    configurations, architectures = configurations or [None], architectures or [None]
    if len(configurations) > 1 and len(architectures) > 1 and len(configurations) != len(architectures):
        raise UsageError(f"{len(configurations)} configurations and {len(architectures)} architectures: give one "
                         "of them once, or both as many times (pairs by position)")
    count = max(len(configurations), len(architectures))
    pairs = list(zip(configurations * count if len(configurations) == 1 else configurations,
                     architectures * count if len(architectures) == 1 else architectures))
    if len(set(pairs)) != len(pairs):
        raise UsageError("the same model is named twice in -c/-a")
    return pairs


def find_postprocessing(roots, dataset_name: str, models):
    """The decision saved for this model (or ensemble), announced either way."""
    from autoseg.inference.ensemble import ensemble_folder, model_name
    from autoseg.inference.postprocessing import load_postprocessing
    from autoseg.preprocessing.preprocess import class_values

    names = [model_name(m.configuration, m.architecture) for m in models]
    if len({tuple(class_values(m.plans)) for m in models}) > 1:
        raise UsageError(f"the models {names} predict different labels and cannot be ensembled")
    folder = (roots.results / dataset_name / names[0] if len(models) == 1
              else ensemble_folder(roots, dataset_name, names))
    decision = load_postprocessing(folder)
    if decision is None:
        print(f"postprocessing: none determined for {' + '.join(names)} yet (it is chosen once every fold is "
              "validated, or by `autoseg find-best`)")
    else:
        print(f"postprocessing: {decision.describe()} (from {folder / 'postprocessing.json'})")
    return decision
