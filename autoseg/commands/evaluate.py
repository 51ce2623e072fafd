"""autoseg evaluate REFERENCES PREDICTIONS -d DATASET: Dice, IoU, HD95, NSD per case and class."""

from __future__ import annotations

from pathlib import Path

from autoseg.cli import add_common
from autoseg.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="compare predictions with reference label maps")
    parser.add_argument("references")
    parser.add_argument("predictions")
    parser.add_argument("-d", "--dataset", help="dataset whose dataset.json names the labels")
    parser.add_argument("--dataset-json", help="a dataset.json to take labels and file ending from instead")
    parser.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    parser.add_argument("--class-tolerance", nargs="*", default=[], metavar="NAME=MM",
                        help="per-class NSD tolerance, e.g. liver=2 vessel=0.5")
    parser.add_argument("-o", "--output", help="folder for summary.json and per_case.csv (default: predictions)")
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_common(parser)
    parser.set_defaults(func=run)


def labels_spec(args):
    """The DatasetSpec that names the labels: from --dataset-json, else the raw (or preprocessed) dataset of -d."""
    from autoseg.dataset.spec import load_dataset_spec
    from autoseg.paths import Roots

    if args.dataset_json:
        return load_dataset_spec(Path(args.dataset_json).parent, with_cases=False, json_file=args.dataset_json)
    if args.dataset:
        roots = Roots.resolve(args.raw, args.preprocessed, args.results)
        name = roots.find_dataset(args.dataset)
        folder = roots.raw_dataset(name) if roots.raw_dataset(name).is_dir() else roots.preprocessed_dataset(name)
        return load_dataset_spec(folder, with_cases=False)
    raise UsageError("give -d DATASET or --dataset-json FILE so that the labels are known")


def run(args) -> int:
    from autoseg.evaluation.evaluate import evaluate_folder, format_table

    spec = labels_spec(args)
    if not 0 < args.tolerance < float("inf"):
        raise UsageError(f"--tolerance {args.tolerance:g}: the NSD tolerance must be a positive number of millimetres")
    tolerance: float | dict[str, float] = args.tolerance
    if args.class_tolerance:
        from autoseg.evaluation.evaluate import evaluation_classes

        classes = sorted(evaluation_classes(spec.labels))  # background and ignore have no surface to score
        tolerance = {name: args.tolerance for name in classes}
        for item in args.class_tolerance:
            name, _, value = item.partition("=")
            try:
                millimetres = float(value)
            except ValueError:
                millimetres = float("nan")
            if name not in classes or not millimetres > 0 or millimetres == float("inf"):
                raise UsageError(f"--class-tolerance {item}: expected NAME=MM with NAME one of {classes} "
                                 "and MM a positive number of millimetres")
            tolerance[name] = millimetres
    output = Path(args.output or args.predictions)
    if output.resolve() == Path(args.references).resolve():
        raise UsageError("the output folder must differ from the references folder", output)
    summary = evaluate_folder(args.references, args.predictions, spec.labels, spec.file_ending, tolerance,
                              args.num_processes, output)
    print(format_table(summary))
    print(f"-> {output / 'summary.json'}, {output / 'per_case.csv'}")
    return 0
