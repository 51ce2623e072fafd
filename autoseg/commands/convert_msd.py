"""autoseg convert-msd TASK_DIR: a Medical Segmentation Decathlon task to the nnU-Net v2 layout."""

from __future__ import annotations

from autoseg.cli import add_common


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert-msd", help="convert an MSD task folder (4D images split into channels)")
    parser.add_argument("task_dir", help="e.g. Task04_Hippocampus")
    parser.add_argument("--id", type=int, help="dataset id to use instead of the task number")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.dataset.msd import convert_msd
    from autoseg.paths import Roots

    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    target = convert_msd(args.task_dir, roots.raw, args.id)
    print(f"converted {args.task_dir} -> {target}")
    return 0
