"""autoseg train DATASET CONFIG FOLD: train one fold of the planned network."""

from __future__ import annotations

from autoseg.cli import add_common


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one fold (0-4 or all)")
    parser.add_argument("dataset")
    parser.add_argument("configuration", help="2d, 3d_fullres or 3d_lowres")
    parser.add_argument("fold", help="0-4 or all")
    parser.add_argument("-a", "--architecture", help="default: the plan's default for the configuration")
    parser.add_argument("--continue", dest="resume", action="store_true", help="resume from checkpoint_latest.pt")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--iters-per-epoch", type=int, default=250)
    parser.add_argument("--val-iters", type=int, default=50)
    parser.add_argument("--time-budget", type=float, help="minutes; the schedule is fitted to end within it")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU (about 2.5x faster)")
    parser.add_argument("--num-workers", type=int, default=2, help="augmentation worker processes (0: in-process)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-validation", action="store_true", help="skip predicting the validation cases at the end")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.errors import UsageError
    from autoseg.paths import Roots
    from autoseg.training.loop import TrainingOptions, train_fold

    if args.epochs < 1 or args.iters_per_epoch < 1 or args.num_workers < 0:
        raise UsageError("--epochs and --iters-per-epoch must be at least 1, --num-workers at least 0")
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    name = roots.find_dataset(args.dataset)
    options = TrainingOptions(epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters,
                              time_budget_minutes=args.time_budget, device=args.device, amp=args.amp,
                              cpu_bf16=args.cpu_bf16, num_workers=args.num_workers, seed=args.seed,
                              resume=args.resume, validate_at_end=not args.no_validation)
    output = train_fold(roots, name, args.configuration, args.fold, args.architecture, options)
    print(f"train: done -> {output}")
    return 0
