"""autoseg find-best -d DATASET: the best model or ensemble of two by cross-validation, and its predict command."""

from __future__ import annotations

from autoseg.cli import add_common


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "find-best", help="rank trained models and ensembles of two by cross-validation Dice; choose postprocessing")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-f", "--folds", nargs="+", help="folds every candidate must have validated "
                        "(default: all folds of splits.json)")
    parser.add_argument("--no-ensembles", action="store_true", help="compare single models only")
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.dataset.spec import load_dataset_spec
    from autoseg.evaluation.find_best import find_best, format_find_best
    from autoseg.paths import Roots

    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    name = roots.find_dataset(args.dataset)
    spec = load_dataset_spec(roots.preprocessed_dataset(name), with_cases=False)
    result = find_best(roots, name, spec.labels, args.folds, not args.no_ensembles, args.num_processes)
    print(format_find_best(result))
    print(f"-> {roots.results / name / 'find_best.json'}, {roots.results / name / 'find_best.txt'}")
    return 0
