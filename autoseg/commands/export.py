"""autoseg export -d DATASET [-c CONFIG...] [-a ARCH...] [-f FOLDS...] | --best, -o NAME.zip: a model package.

The package holds what ``autoseg predict -m NAME.zip`` and ``autoseg.Segmenter`` need, and
nothing else: plans, dataset.json, the folds' weights, the postprocessing and a manifest
(``model.json``) with the cross-validation scores and the sha256 of every member.
"""

from __future__ import annotations

from autoseg.cli import add_common
from autoseg.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="pack a trained model (or ensemble) into one zip")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-o", "--output", required=True, help="the package, NAME.zip")
    parser.add_argument("-c", "--configuration", nargs="+", default=None,
                        help="default: the plan's default configuration; several: an ensemble")
    parser.add_argument("-a", "--architecture", nargs="+", default=None,
                        help="default: the configuration's default; several: an ensemble")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="default: 0 1 2 3 4")
    parser.add_argument("--best", action="store_true",
                        help="export what `autoseg find-best` chose (its models and folds; -c/-a/-f not allowed)")
    parser.add_argument("--checkpoint", choices=["final", "best"], default=None,
                        help="which weights of each fold (default: final: finished folds only)")
    parser.add_argument("--onnx", action="store_true",
                        help="also the networks as ONNX, for `predict --engine onnxruntime` (unet, resenc_unet)")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.commands.predict import planned_models
    from autoseg.inference.ensemble import split_model_name
    from autoseg.inference.package_export import export_package
    from autoseg.paths import Roots

    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    name = roots.find_dataset(args.dataset)
    if args.best:
        from autoseg.evaluation.find_best import load_find_best

        if args.configuration or args.architecture or args.folds:
            raise UsageError("--best exports find-best's choice: leave out -c, -a and -f")
        choice = load_find_best(roots.results / name / "find_best.json")
        members = [split_model_name(member) for member in choice.ranking[0].members]
        folds = choice.folds
    else:
        members = planned_models(roots, name, args.configuration, args.architecture)
        folds = args.folds or ["0", "1", "2", "3", "4"]
    manifest = export_package(roots, name, members, folds, args.output, args.checkpoint, args.onnx)
    size = sum(f.size for f in manifest.files.values())
    print(f"export: {' + '.join(f'{c}__{a}' for c, a in members)}, folds {' '.join(folds)}, "
          f"{len(manifest.files) + 1} members ({size / 2**20:.1f} MB unpacked) -> {args.output}")
    return 0
