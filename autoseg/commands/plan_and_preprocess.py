"""autoseg plan-and-preprocess -d DATASET: check + fingerprint, plan, preprocess."""

from __future__ import annotations

import sys
import time

from autoseg.cli import add_common
from autoseg.errors import UsageError
from autoseg.paths import Roots


def register(subparsers) -> None:
    parser = subparsers.add_parser("plan-and-preprocess", help="check, fingerprint, plan and preprocess a dataset")
    parser.add_argument("-d", "--dataset", required=True, nargs="+", help="dataset id(s) or name(s)")
    parser.add_argument("-c", "--configurations", nargs="+", help="configurations to preprocess (default: all planned)")
    parser.add_argument("-np", "--num-processes", type=int, default=2,
                        help="worker processes that fingerprint, plan (the architectures side by side) and preprocess")
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0, help="memory budget the plan is sized for")
    parser.add_argument("-a", "--architectures", nargs="+", help="architectures to plan (default: all available)")
    parser.add_argument("--no-preprocess", action="store_true", help="stop after writing plans.json")
    parser.add_argument("--keep-plans", action="store_true", help="keep an existing (possibly edited) plans.json")
    parser.add_argument("--summary", action="store_true",
                        help="print parameters, forward GFLOPs per patch and the memory estimate per architecture")
    parser.add_argument("--plans-from", metavar="SOURCE",
                        help="plan with the configurations (spacing, topology, patch, batch) of SOURCE (a dataset "
                             "or a plans.json), so its trained networks fine-tune here; normalisation, channels "
                             "and labels stay this dataset's")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.num_processes < 1:
        raise UsageError("-np must be at least 1")
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    for dataset in args.dataset:
        plan_and_preprocess_one(roots, roots.find_dataset(dataset), args)
    return 0


def plan_and_preprocess_one(roots: Roots, name: str, args) -> None:
    # Imported here so that `autoseg --help` and other commands start without loading torch.
    from autoseg.dataset.spec import load_dataset_spec
    from autoseg.fingerprint import compute_fingerprint, save_fingerprint
    from autoseg.planning.planner import plan_dataset
    from autoseg.planning.plans import load_plans, save_plans
    from autoseg.preprocessing.preprocess import preprocess_dataset
    from autoseg.records import check_writable_folder, copy_file_atomic

    raw = roots.raw_dataset(name)
    spec = load_dataset_spec(raw)
    out = roots.preprocessed_dataset(name)
    if out.resolve().is_relative_to(spec.root):  # the same folder, or one inside the raw dataset
        raise UsageError(f"the preprocessed data would be written into the raw dataset {spec.root}; "
                         "give --preprocessed (AUTOSEG_PREPROCESSED) another folder", out)
    start = time.perf_counter()
    fingerprint = compute_fingerprint(raw, args.num_processes)  # checks everything before anything is written
    plans_file = roots.plans_file(name)
    kept = load_plans(plans_file) if args.keep_plans and plans_file.exists() else None  # validated before writing
    source_plans = _source_plans(roots, args.plans_from) if getattr(args, "plans_from", None) else None
    source_name = source_plans.dataset_name if source_plans else None
    if source_plans is not None and kept is not None:
        raise UsageError("--plans-from and --keep-plans exclude each other (which plan should win?)")
    check_writable_folder(out)
    save_fingerprint(fingerprint, roots.fingerprint_file(name))
    copy_file_atomic(raw / "dataset.json", out / "dataset.json")
    say(f"{name}: {len(fingerprint.cases)} cases checked and fingerprinted in {time.perf_counter() - start:.1f} s "
        f"-> {roots.fingerprint_file(name)}")
    if kept is not None:
        plans = kept
        say(f"{name}: keeping {plans_file}")
    else:
        plans = plan_dataset(fingerprint, spec.labels, args.gpu_memory_gb, args.architectures,
                             spec.regions_class_order, args.num_processes)
        if source_plans is not None:
            from autoseg.planning.plans_from import plans_from_source

            plans = plans_from_source(plans, source_plans, source_name)
        for configuration in args.configurations or []:  # a misspelt -c, refused before the plan is written
            plans.configuration(configuration)
        save_plans(plans, plans_file)
        say(f"{name}: planned {', '.join(plans.configurations)}"
            f"{f' with the configurations of {source_name}' if source_name else ''} -> {plans_file}")
    for config in plans.configurations.values():
        arch = config.architectures[config.default_architecture]
        say(f"  {config.name:11s} spacing {_fmt(config.spacing)}  patch {'x'.join(map(str, arch.patch_size))}  "
            f"batch {arch.batch_size}  stages {len(arch.strides)}  ~{arch.estimated_memory_gb:.1f} GB")
    if args.summary:
        print_summary(plans)
    if args.no_preprocess:
        return
    for configuration in args.configurations or list(plans.configurations):
        plans.configuration(configuration)
        start = time.perf_counter()
        done, skipped = preprocess_dataset(spec, plans, configuration, out, args.num_processes)
        say(f"{name}: {configuration}: {done} case(s) preprocessed, {skipped} already done, "
            f"{time.perf_counter() - start:.1f} s -> {out / plans.configurations[configuration].data_identifier}")


def _source_plans(roots: Roots, source: str):
    """--plans-from: a dataset id or name (its preprocessed plans.json), or a plans.json file."""
    from pathlib import Path

    from autoseg.planning.plans import load_plans

    if source.endswith(".json") or Path(source).is_file():
        return load_plans(source)
    return load_plans(roots.plans_file(roots.find_dataset(source)))


def print_summary(plans) -> None:
    """Per configuration and architecture: patch, batch, parameters, forward FLOPs per patch, memory."""
    from autoseg.networks.flops import forward_flops
    from autoseg.networks.registry import build_network

    say(f"{'configuration':13s} {'architecture':14s} {'patch':>14s} {'batch':>5s} {'params (M)':>10s} "
        f"{'GFLOPs/patch':>12s} {'memory (GB)':>11s}")
    for config in plans.configurations.values():
        for arch in config.architectures.values():
            network = build_network(arch, plans.num_input_channels, plans.num_segmentation_heads, config.dimensions,
                                    deep_supervision=False)
            flops = forward_flops(network, (1, plans.num_input_channels, *arch.patch_size))
            say(f"{config.name:13s} {arch.name:14s} {'x'.join(map(str, arch.patch_size)):>14s} {arch.batch_size:5d} "
                f"{arch.num_parameters / 1e6:10.2f} {flops / 1e9:12.1f} {arch.estimated_memory_gb:11.2f}")
    say("GFLOPs: one forward pass of one patch (convolutions and matrix products); memory: the planner's "
        "estimate of one training step at that batch with mixed precision")


def _fmt(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
