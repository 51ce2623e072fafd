"""autoseg check -d DATASET: the integrity check alone; writes nothing."""

from __future__ import annotations

import sys

from autoseg.cli import add_common
from autoseg.dataset.check import check_dataset, raise_if_problems
from autoseg.paths import Roots


def register(subparsers) -> None:
    parser = subparsers.add_parser("check", help="check a raw dataset and report every problem")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id (4) or name (Dataset004_Hippocampus)")
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    name = roots.find_dataset(args.dataset)
    folder = roots.raw_dataset(name)
    problems = check_dataset(folder, args.num_processes)
    raise_if_problems(problems, folder)
    print(f"{name}: no problems found", file=sys.stdout)
    return 0
