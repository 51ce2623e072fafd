#!/usr/bin/env python3
"""Does transfer pay on a small dataset? Hippocampus with few labels, same CPU budget, three arms.

    python scripts/bench_transfer.py [--minutes 20] [--seeds 0 1 2] [--labelled 20] [--source-minutes M]
                                     [--pretrain-minutes M] [--warmup-epochs 0] [--configuration 2d]
                                     [--gpu-memory-gb 0.6] [--work DIR]

Fold 0 of Hippocampus, its training part cut to the first ``--labelled`` cases (the
validation part unchanged: the same cases for every arm), validation Dice after:

(a) ``train`` from scratch for ``--minutes``;
(b) ``pretrain`` (masked-volume inpainting, labels unused) for half of it, then
    ``train --pretrained`` for the other half. The unlabelled pool is every
    Hippocampus image but fold 0's validation cases (the training part of imagesTr, and
    imagesTs where there is one, through a raw folder of links): pre-training on the images it is scored on
    would flatter (b). ``--pretrain-minutes`` pre-trains longer than half (the fine-tune keeps its
    half): what more pre-training would buy, the arm then over the budget by the difference;
(c) ``train --pretrained`` for half of it from a model trained on ACDC (planned with
    Hippocampus' configurations: ``plan-and-preprocess -d 27 --plans-from 4``, fold ``all``,
    ``--source-minutes``, twice ``--minutes`` by default; that source training is not counted in
    the budget, as a downloaded model would not be; its last pseudo-Dice is printed, so a source
    that learned little shows).

No warm-up by default, so that (b) and (c) differ from (a/2) in their start only (the warm-up,
since it scales gradients rather than the learning rate, helps from scratch too: README). Its
first version, a learning-rate ramp, is what sank (b) and (c) in the runs before 2026-12-04.

and, as a yardstick for (b) and (c), (a/2): from scratch for half of ``--minutes``, the supervised
time (b) and (c) have: (b) or (c) above (a/2) means their start is worth something per supervised
minute, and (a) above them means it is worth less than the minutes it costs.

Each side's budget counts its training (and pre-training) time only; the end-of-fold
validation (sliding window + mirroring on the 40 validation cases) is after it and
identical for all arms. Prints per arm the mean and spread (sample std) over the seeds and
the difference to (a). The work folder is kept: a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TARGET, SOURCE = "Dataset004_Hippocampus", "Dataset027_ACDC"
# 0.6 GB plans the 2d U-Net at batch 19 (1 GB: batch 126, ~30 steps in 5 CPU minutes, which
# measures nothing); a CPU budget buys steps, so the small batch is the fair plan for every arm.
PLAN_GPU_MEMORY_GB = 0.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="the budget of each arm")
    parser.add_argument("--source-minutes", type=float, default=None, help="ACDC training (default: 2 x --minutes)")
    parser.add_argument("--pretrain-minutes", type=float, default=None, help="(b)'s pre-training (default: --minutes / 2)")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="--warmup-epochs of the fine-tuning arms (b), (c)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labelled", type=int, default=20)
    parser.add_argument("--configuration", default="2d", choices=["2d", "3d_fullres"])
    parser.add_argument("--gpu-memory-gb", type=float, default=PLAN_GPU_MEMORY_GB, help="plan for this memory budget")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoseg_bench_transfer"))
    args = parser.parse_args()
    for name in (TARGET, SOURCE):
        if not (DATA / name).is_dir():
            sys.exit(f"skipped: {DATA / name} is missing")
    raw, pre = args.work / "raw", args.work / "pre"
    config, half = args.configuration, args.minutes / 2
    validation = prepare_target(args.work, config, args.labelled, args.gpu_memory_gb)
    if not (raw / SOURCE).exists():
        (raw / SOURCE).symlink_to(DATA / SOURCE)
    pretrain_minutes = args.pretrain_minutes or half

    def autoseg(results: Path, *command: str, log: Path | None = None, raw_root: Path = raw) -> None:
        env = child_env(AUTOSEG_RAW=str(raw_root), AUTOSEG_PREPROCESSED=str(pre), AUTOSEG_RESULTS=str(results),
                        PYTHONUNBUFFERED="1")
        log = log or results / "bench_log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            done = subprocess.run([sys.executable, "-m", "autoseg", *command], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"`autoseg {' '.join(command)}` failed; see {log}")

    plan = ["-c", config, "--gpu-memory-gb", str(args.gpu_memory_gb), "-np", "2"]
    pool = _pool_without(raw / TARGET, validation, args.work / "raw_pool")
    source_model = args.work / "res_source" / SOURCE / f"{config}__unet" / "fold_all" / "checkpoint_final.pt"
    if not source_model.exists():
        autoseg(args.work / "res_source", "plan-and-preprocess", "-d", SOURCE, "--plans-from", TARGET, *plan)
        autoseg(args.work / "res_source", "train", SOURCE, config, "all", "--time-budget",
                str(args.source_minutes or 2 * args.minutes), "--seed", "0")
    fine_tune = ["--warmup-epochs", str(args.warmup_epochs)] if args.warmup_epochs else []
    train = ["train", TARGET, config, "0", "--seed"]
    results: dict[str, list[float]] = {"a": [], "a_half": [], "b": [], "c": []}
    for seed in args.seeds:
        arm = {k: args.work / f"res_{k}_{seed}" for k in results}
        if pretrain_minutes != half:  # its own folder: the default arm's runs stay as they are
            arm["b"] = args.work / f"res_b{pretrain_minutes:g}_{seed}"
        if not _summary(arm["a"], config).exists():
            autoseg(arm["a"], *train, str(seed), "--time-budget", str(args.minutes))
        if not _summary(arm["a_half"], config).exists():
            autoseg(arm["a_half"], *train, str(seed), "--time-budget", str(half))
        if not _summary(arm["b"], config).exists():
            pretrained = arm["b"] / TARGET / "pretrain" / f"{config}__unet" / "checkpoint_final.pt"
            if not pretrained.exists():
                autoseg(arm["b"], "pretrain", "-d", TARGET, "-c", config, "--time-budget", str(pretrain_minutes),
                        "--seed", str(seed), raw_root=pool)
            autoseg(arm["b"], *train, str(seed), "--time-budget", str(half), "--pretrained", str(pretrained),
                    *fine_tune)
        if not _summary(arm["c"], config).exists():
            autoseg(arm["c"], *train, str(seed), "--time-budget", str(half), "--pretrained", str(source_model),
                    *fine_tune)
        for key in results:
            results[key].append(json.loads(_summary(arm[key], config).read_text())["mean_foreground"]["dice"])
    print(f"\nHippocampus {config} fold 0, {args.labelled} labelled training cases, {args.minutes:g} min per arm, "
          f"seeds {args.seeds}, {os.cpu_count()} CPU cores, warm-up {args.warmup_epochs} epoch(s); validation Dice "
          "(mean over foreground classes)")
    source_epochs = [json.loads(line) for line in (source_model.parent / "training_log.jsonl").read_text().splitlines()]
    print(f"source of (c): ACDC {config} U-Net, {len(source_epochs)} epochs, "
          f"{sum(epoch['iterations'] for epoch in source_epochs)} iterations, last pseudo-Dice "
          f"{source_epochs[-1]['pseudo_dice_mean']:.3f} (on its own training cases: fold all)")
    labels = {"a": "(a) from scratch", "a_half": "(a/2) from scratch, half the budget",
              "b": f"(b) pretrain {pretrain_minutes:g} min + fine-tune 1/2", "c": "(c) ACDC model + fine-tune 1/2"}
    for key, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        gain = statistics.mean(values) - statistics.mean(results["a"])
        print(f"{labels[key]:<38} {statistics.mean(values):.3f} ± {spread:.3f}  "
              f"({', '.join(f'{v:.3f}' for v in values)})" + (f"  vs (a): {gain:+.3f}" if key != "a" else ""))


def _summary(results: Path, config: str) -> Path:
    return results / TARGET / f"{config}__unet" / "fold_0" / "validation" / "summary.json"


def prepare_target(work: Path, config: str, labelled: int, gpu_memory_gb: float = PLAN_GPU_MEMORY_GB) -> list[str]:
    """Hippocampus linked under ``work/raw``, planned and preprocessed into ``work/pre`` (once per work
    folder), its fold 0 cut to ``labelled`` training cases; returns fold 0's validation cases."""
    raw, pre = work / "raw", work / "pre"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / TARGET).exists():
        (raw / TARGET).symlink_to(DATA / TARGET)
    if not (pre / TARGET / "plans.json").exists():
        sys.path.insert(0, str(REPO))
        from autoseg.cli import main as autoseg_cli

        if autoseg_cli(["plan-and-preprocess", "-d", TARGET, "-c", config, "--gpu-memory-gb", str(gpu_memory_gb),
                        "-np", "2", f"--raw={raw}", f"--preprocessed={pre}"]):
            sys.exit("plan-and-preprocess failed")
    return _few_labels(pre / TARGET, config, labelled)


def _few_labels(preprocessed: Path, config: str, labelled: int) -> list[str]:
    """splits.json with fold 0's training part cut to its first ``labelled`` cases (validation unchanged);
    returns fold 0's validation cases."""
    sys.path.insert(0, str(REPO))
    from autoseg.planning.plans import load_plans
    from autoseg.preprocessing.store import list_finished_cases
    from autoseg.training.splits import make_splits

    cases = list_finished_cases(preprocessed / load_plans(preprocessed / "plans.json").configuration(config)
                                .data_identifier)
    splits = make_splits(cases)
    splits[0]["train"] = sorted(splits[0]["train"])[:labelled]
    (preprocessed / "splits.json").write_text(json.dumps(splits, indent=1))
    return list(splits[0]["val"])


def _pool_without(dataset: Path, excluded: list[str], root: Path) -> Path:
    """A raw root whose copy of ``dataset`` links every image but those of ``excluded`` cases."""
    from autoseg.inference.folder import list_input_cases  # after _few_labels put REPO on sys.path

    num_channels = len(json.loads((dataset / "dataset.json").read_text())["channel_names"])
    target = root / dataset.name
    for folder in ("imagesTr", "imagesTs"):
        if not (dataset / folder).is_dir():
            continue
        (target / folder).mkdir(parents=True, exist_ok=True)
        for case in list_input_cases(dataset / folder, num_channels):
            if folder == "imagesTr" and case.case_id in excluded:
                continue
            for image in case.files:
                if not (target / folder / image.name).exists():
                    (target / folder / image.name).symlink_to(image.resolve())
    return root


if __name__ == "__main__":
    main()
