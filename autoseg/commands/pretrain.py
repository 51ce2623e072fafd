"""autoseg pretrain -d DATASET -c CONFIG: self-supervised pre-training on images without labels."""

from __future__ import annotations

from pathlib import Path

from autoseg.cli import add_common, refuse_contradicting_precision


def register(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="self-supervised pre-training (masked-volume inpainting; for "
                                                    "Swin UNETR also rotation and contrastive) on unlabelled images; "
                                                    "feed the result to train --pretrained")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (its plan and images)")
    parser.add_argument("-c", "--configuration", required=True, help="a planned configuration: 2d, 3d_fullres ...")
    parser.add_argument("-a", "--architecture", help="default: the plan's default for the configuration")
    parser.add_argument("--images", nargs="+", type=Path, default=[], metavar="FOLDER",
                        help="more folders of unlabelled scans (same channels) besides imagesTr and imagesTs")
    parser.add_argument("--task", default="inpainting", choices=["inpainting", "inpainting+rotation+contrastive"],
                        help="inpainting (every architecture): random cubes masked, reconstructed (loss on them "
                             "only); inpainting+rotation+contrastive (-a swin_unetr only): Swin UNETR's three "
                             "tasks (Tang et al. 2022) on two rotated, masked views of each patch, losses summed")
    parser.add_argument("--continue", dest="resume", action="store_true", help="resume from checkpoint_latest.pt")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--iters-per-epoch", type=int, default=250)
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="fit the number of epochs so the run ends within it (kept by --continue, as train's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    parser.add_argument("--num-workers", type=int, default=0, help="patch-drawing processes (default 0: in-process)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--fp32", action="store_true",
                        help="float32 throughout (default: mixed precision on CUDA as train has it: bf16, fp16 with "
                             "a gradient scaler where bf16 is missing; float32 on the CPU unless --cpu-bf16)")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU too (not measured for "
                                                                 "pre-training; fast only with native bf16 units)")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.cli import STARTED
    from autoseg.paths import Roots
    from autoseg.pretraining.run import PretrainingOptions, pretrain

    refuse_contradicting_precision(args)
    roots = Roots.resolve(args.raw, args.preprocessed, args.results)
    options = PretrainingOptions(epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                                 time_budget_minutes=args.time_budget, extra_image_folders=list(args.images),
                                 task=args.task, device=args.device, num_workers=args.num_workers, seed=args.seed,
                                 resume=args.resume, amp=not args.fp32,
                                 cpu_bf16=args.cpu_bf16, started=STARTED)
    output = pretrain(roots, roots.find_dataset(args.dataset), args.configuration, args.architecture, options)
    print(f"pretrain: done -> {output}")
    return 0
