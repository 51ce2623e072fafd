"""autoseg ensemble -i A B [C ...] -o OUT: average the saved probabilities of prediction folders."""

from __future__ import annotations

from pathlib import Path

from autoseg.cli import add_common


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ensemble", help="average the probabilities of prediction folders (predict --save-probabilities) into labels")
    parser.add_argument("-i", "--input", nargs="+", required=True,
                        help="two or more folders written by predict --save-probabilities, each with CASE.npz "
                             "beside every label map")
    parser.add_argument("-o", "--output", required=True, help="folder for the ensemble's label maps")
    parser.add_argument("--postprocessing", metavar="FILE",
                        help="a postprocessing.json to apply (find-best writes the ensemble's beside its results); "
                             "default: none")
    parser.add_argument("--save-probabilities", action="store_true", help="also write the averaged CASE.npz")
    parser.add_argument("--overwrite", action="store_true", help="write cases whose label map is already there")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.errors import UsageError
    from autoseg.inference.ensemble_folders import ensemble_folders
    from autoseg.inference.postprocessing import POSTPROCESSING_FILE, load_postprocessing

    decision = None
    if args.postprocessing:
        path = Path(args.postprocessing)
        if path.name != POSTPROCESSING_FILE or not path.is_file():
            raise UsageError(f"--postprocessing takes an existing {POSTPROCESSING_FILE}", path)
        decision = load_postprocessing(path.parent)
    result = ensemble_folders([Path(f) for f in args.input], Path(args.output), decision, args.save_probabilities,
                              args.overwrite)
    print(f"ensemble of {len(args.input)} folders: {len(result.written)} written, "
          f"{len(result.skipped_existing)} already there"
          f"{', postprocessing: ' + decision.describe() if decision else ''} -> {args.output}")
    return 0
