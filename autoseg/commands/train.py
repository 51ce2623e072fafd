"""autoseg train DATASET CONFIG FOLD: train one fold of the planned network.

Also runs under ``torchrun --nproc_per_node=N -m autoseg train ...`` (one process per
device; the planned batch is split across them, only rank 0 writes).
"""

from __future__ import annotations

import argparse
import os

from autoseg.cli import add_common, refuse_contradicting_precision
from autoseg.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one fold (0-4 or all)")
    parser.add_argument("dataset", help="dataset id (4) or name (Dataset004_Hippocampus)")
    parser.add_argument("configuration", help="a planned configuration: 2d, 3d_fullres, 3d_lowres")
    parser.add_argument("fold", help="0-4 (the folds of splits.json) or all")
    parser.add_argument("-a", "--architecture", help="default: the plan's default for the configuration")
    parser.add_argument("--continue", dest="resume", action="store_true", help="resume from checkpoint_latest.pt")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--iters-per-epoch", type=int, default=250)
    parser.add_argument("--val-iters", type=int, default=50)
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="images per optimiser step (default: the plan's; on the CPU at most 2 for 3D "
                             "configurations, where a larger batch costs its full time per image)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="fit the number of epochs (measured after a few iterations) so the run ends within it; "
                             "--continue keeps a run's budget, the time spent up to its checkpoint counted "
                             "(given with --continue: the whole run's new budget)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    parser.add_argument("--fp32", action="store_true",
                        help="train in float32 (default: bf16 autocast on CUDA, fp16 + gradient scaler on GPUs without "
                             "bf16, and bf16 on CPUs with native bf16 units, where a step is about twice as fast)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="bf16 autocast on the CPU even without native bf16 units (emulated: usually slower)")
    parser.add_argument("--num-workers", type=int,
                        help="augmentation processes (default: min(4, cores) on the CPU, min(12, cores) on a GPU as "
                             "nnU-Net, or nnU-Net's nnUNet_n_proc_DA where set; fewer where /dev/shm is small; "
                             "0 in-process)")
    parser.add_argument("--seed", type=int, help="with --num-workers 0 on the CPU, a run is repeatable")
    parser.add_argument("--group-cases", metavar="REGEX",
                        help=r"cases whose first group matches share a fold (default '^(patient\d+)_')")
    parser.add_argument("--no-validation", action="store_true", help="skip predicting the validation cases at the end")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="validation also writes each case's class probabilities (find-best needs them for ensembles)")
    parser.add_argument("--validation-only", action="store_true",
                        help="only (re-)run the end-of-training validation of a trained fold")
    parser.add_argument("--pretrained", metavar="CHECKPOINT",
                        help="start from these weights: an autoseg checkpoint (training or pretrain), an exported "
                             "state dict or an nnU-Net v2 checkpoint_final.pth; tensors whose name and shape match "
                             "are loaded, the rest stay freshly initialised (table in fold_N/transfer.txt)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="accept a --pretrained that loads less than half of the encoder's weights")
    parser.add_argument("--warmup-epochs", type=int, default=0,
                        help="ramp the steps linearly from ~0 to the schedule's over this many epochs (each "
                             "gradient is scaled before SGD's momentum, see README)")
    parser.add_argument("--freeze-encoder-epochs", type=int, default=0,
                        help="with --pretrained: do not update the encoder for this many epochs (decoder and heads "
                             "adapt first)")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.cli import STARTED
    from autoseg.paths import Roots
    from autoseg.training import TrainingOptions, train_fold
    from autoseg.training.splits import DEFAULT_GROUP_PATTERN

    refuse_contradicting_precision(args)
    if args.validation_only and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # ranks would write one folder
        raise UsageError("--validation-only runs in one process: start it without torchrun")
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    name = roots.find_dataset(args.dataset)
    if args.validation_only:
        from autoseg.training.distributed import select_device
        from autoseg.training.validation import validate_trained_fold

        output = validate_trained_fold(roots, name, args.configuration, args.fold, args.architecture,
                                       select_device(args.device), args.save_probabilities)
        print(f"train: validation done -> {output}")
        return 0
    options = TrainingOptions(epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
                              batch_size=args.batch_size, time_budget_minutes=args.time_budget, device=args.device,
                              amp=args.amp and not args.fp32, cpu_bf16=True if args.cpu_bf16 else None,
                              num_workers=args.num_workers, seed=args.seed,
                              resume=args.resume, validate_at_end=not args.no_validation,
                              save_probabilities=args.save_probabilities,
                              group_pattern=args.group_cases or DEFAULT_GROUP_PATTERN, started=STARTED,
                              pretrained=args.pretrained, allow_partial=args.allow_partial,
                              warmup_epochs=args.warmup_epochs, freeze_encoder_epochs=args.freeze_encoder_epochs)
    output = train_fold(roots, name, args.configuration, args.fold, args.architecture, options)
    if int(os.environ.get("RANK", "0")) == 0:  # train_fold has ended the process group: torchrun's variable says
        print(f"train: done -> {output}")
    return 0
