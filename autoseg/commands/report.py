"""autoseg report: figures of every case, worst first, and one static HTML page to look at them.

Two ways to call it: ``autoseg report REFERENCES PREDICTIONS -d DATASET`` for a folder of
predictions (after ``autoseg evaluate``), or ``autoseg report -d DATASET -c CONFIG -f FOLD``
for the validation of trained folds (with their training curves).
"""

from __future__ import annotations

from pathlib import Path

from autoseg.cli import add_common
from autoseg.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="figures and an HTML page of where predictions are wrong")
    parser.add_argument("references", nargs="?", help="folder of reference label maps")
    parser.add_argument("predictions", nargs="?", help="folder of predicted label maps (same file names)")
    parser.add_argument("-d", "--dataset", help="dataset (labels, images, CT window)")
    parser.add_argument("--dataset-json", help="a dataset.json to take labels and file ending from instead")
    parser.add_argument("-c", "--configuration", help="report a trained model's validation: its configuration")
    parser.add_argument("-a", "--architecture", help="... and architecture (default: the configuration's default)")
    parser.add_argument("-f", "--folds", nargs="+", help="... and folds (default: every fold with a validation)")
    parser.add_argument("-o", "--output", help="report folder (default: PREDICTIONS/report, or report_fold_N "
                                                "beside the trained folds)")
    parser.add_argument("--images", help="folder of the images (default: the imagesXx beside labelsXx, then the "
                                         "dataset's imagesTr and imagesTs)")
    parser.add_argument("--channel", type=int, help="image channel to draw in grey (default: channel 0, or the "
                                                     "colour image where the files are RGB)")
    parser.add_argument("--worst", type=int, default=10, help="how many of the worst cases the page shows (default 10)")
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.commands.evaluate import labels_spec
    from autoseg.paths import Roots
    from autoseg.planning.plans import load_plans
    from autoseg.report.build import build_report, staged_output
    from autoseg.report.sources import folder_sources, trained_sources

    if args.worst < 0 or (args.channel or 0) < 0:
        raise UsageError("--worst and --channel must not be negative")
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    if args.references and args.predictions:
        if args.configuration or args.folds or args.architecture:
            raise UsageError("-c/-a/-f report a trained model's validation; leave out REFERENCES PREDICTIONS for that")
        spec = labels_spec(args)
        name = roots.find_dataset(args.dataset) if args.dataset else None
        plans_file = roots.plans_file(name) if name else None
        plans = load_plans(plans_file) if plans_file and plans_file.is_file() else None
        fingerprint = roots.fingerprint_file(name) if name else None
        output = Path(args.output or Path(args.predictions) / "report")
        with staged_output(output) as stage:
            sources = folder_sources(args.references, args.predictions, spec, args.channel, args.images, plans,
                                     fingerprint, stage, args.num_processes)
            record = build_report(sources, stage, args.worst, args.num_processes)
    elif args.references or args.predictions:
        raise UsageError("give both REFERENCES and PREDICTIONS folders, or neither (with -d/-c/-f for a trained model)")
    else:
        if not args.dataset:
            raise UsageError("give REFERENCES PREDICTIONS folders, or -d DATASET [-c CONFIG -f FOLD] for a trained model")
        name = roots.find_dataset(args.dataset)
        configuration, architecture = _model(roots, name, args.configuration, args.architecture)
        model_dir = roots.training_output(name, configuration, architecture, 0).parent
        sources = trained_sources(roots, name, configuration, architecture, args.folds, args.channel)
        folds = list(dict.fromkeys(case.fold for case in sources.cases))
        output = Path(args.output) if args.output else model_dir / f"report_fold_{'_'.join(folds)}"
        with staged_output(output) as stage:
            record = build_report(sources, stage, args.worst, args.num_processes)
    worst = record.cases[0]
    print(f"report: {len(record.cases)} case(s), worst {worst.case_id} (mean Dice {worst.mean_dice:.3f}) "
          f"-> {output / 'index.html'}")
    return 0


def _model(roots, name: str, configuration: str | None, architecture: str | None) -> tuple[str, str]:
    """Configuration and architecture of the trained model: as given, else the plan's defaults."""
    from autoseg.planning.plans import load_plans

    plans_file = roots.plans_file(name)
    plans = load_plans(plans_file) if plans_file.is_file() else None
    configuration = configuration or (plans.default_configuration if plans else "3d_fullres")
    architecture = architecture or (plans.architecture(configuration).name if plans else "unet")
    return configuration, architecture
