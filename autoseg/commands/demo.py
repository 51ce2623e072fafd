"""autoseg demo: make the synthetic dataset and run every stage on it, saying what it did."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from autoseg.cli import add_common
from autoseg.dataset.synthetic import make_synthetic_dataset


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on a synthetic dataset autoseg makes itself")
    parser.add_argument("-o", "--output", default="autoseg_demo", help="working folder (default: ./autoseg_demo)")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="shortest possible training (for tests)")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.cli import main

    work = Path(args.output).resolve()
    roots = {key: work / key for key in ("raw", "preprocessed", "results")}
    print(f"demo: making a synthetic dataset of {args.cases} cases under {roots['raw']}")
    # Made afresh, as are its predictions: a demo run again (with another --cases, or after --quick) must
    # neither train on an earlier run's cases nor evaluate an earlier model's masks that predict would skip.
    # Its store, splits and models too: the folds of an earlier run name cases this one may not have.
    made = [roots[key] / "Dataset999_Synthetic" for key in ("raw", "preprocessed", "results")]
    for made_by_the_demo in made + [work / "predictions"]:
        shutil.rmtree(made_by_the_demo, ignore_errors=True)
    make_synthetic_dataset(roots["raw"], num_cases=args.cases)
    flags = [f"--raw={roots['raw']}", f"--preprocessed={roots['preprocessed']}", f"--results={roots['results']}"]
    steps = demo_steps(args, work)
    for title, argv in steps:
        print(f"\ndemo: {title}\n  $ autoseg {' '.join(argv)}")
        code = main(argv + flags)
        if code:
            print(f"demo: step failed with exit code {code}")
            return code
    print(f"\ndemo: done; everything is under {work}")
    return 0


def demo_steps(args: argparse.Namespace, work: Path) -> list[tuple[str, list[str]]]:
    epochs = (["--epochs", "2", "--iters-per-epoch", "4", "--val-iters", "2"] if args.quick
                     else ["--epochs", "10", "--iters-per-epoch", "25", "--val-iters", "5"])
    raw = work / "raw" / "Dataset999_Synthetic"
    return [
        ("check the dataset", ["check", "-d", "999"]),
        ("fingerprint, plan and preprocess", ["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "--summary"]),
        ("train fold 0 (a short schedule; a real run is 1000 epochs x 250 iterations)",
         ["train", "999", "3d_fullres", "0", *epochs, "--seed", "0"]),
        ("predict the test images", ["predict", "-i", str(raw / "imagesTs"), "-o", str(work / "predictions"),
                                     "-d", "999", "-c", "3d_fullres", "-f", "0"]),
        ("evaluate the predictions", ["evaluate", str(raw / "labelsTs"), str(work / "predictions"), "-d", "999"]),
        ("draw where fold 0 is wrong on its validation cases (open report_fold_0/index.html)",
         ["report", "-d", "999", "-c", "3d_fullres", "-f", "0"]),
    ]
