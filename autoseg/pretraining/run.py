"""``pretrain``: self-supervised pre-training of a planned architecture on images without labels.

    from autoseg.pretraining.run import PretrainingOptions, pretrain

    output = pretrain(roots, "Dataset004_Hippocampus", "3d_fullres", "unet",
                      PretrainingOptions(time_budget_minutes=60, extra_image_folders=[Path("/data/scans")]))

The network is the plan's, built with one output per input channel; ``MaskedInpainting``
masks cubes of each patch and the loss is the reconstruction error on them (``--task
inpainting``, every architecture). Swin UNETR can instead learn the seed paper's three tasks
at once (``--task inpainting+rotation+contrastive``, ``autoseg.pretraining.swin_ssl``). Everything else
is training's: the same ``TrainingLoop`` (no validation pass: there is nothing to segment),
SGD with poly decay, ``TimeBudget``, checkpoints every epoch (``--continue``), the log and
``progress.png``. Checkpoints say ``format: autoseg-pretraining`` and list the output-head
tensors (``pretrain_head_names``), which ``train --pretrained`` leaves out: a reconstruction
head is no segmentation head, even where the shapes happen to agree.

Output: ``AUTOSEG_RESULTS/DatasetNNN_Name/pretrain/<configuration>__<architecture>/``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoseg.errors import UsageError
from autoseg.networks.call_size import training_images_per_call
from autoseg.networks.memory import build_shapes_only
from autoseg.networks.registry import build_network
from autoseg.networks.swin_unetr import LEVEL_WIDTHS, feature_size_of
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans
from autoseg.pretraining.data import UnlabelledPatchSampler, preprocess_unlabelled
from autoseg.pretraining.inpainting import MaskedInpainting, MaskedReconstructionLoss
from autoseg.pretraining.swin_ssl import (TASK as SWIN_TASK, RotationContrastiveInpainting,
                                          RotationContrastiveInpaintingLoss, attach_heads, rotation_axes)
from autoseg.records import check_writable_folder
from autoseg.training.callbacks import CheckpointWriter, ProgressWriter, time_budget_callbacks
from autoseg.training.checkpoints import check_identity, load_checkpoint, set_rng_state
from autoseg.training.data import batch_iterator
from autoseg.training.distributed import select_device
from autoseg.training.fold import TrainingOptions, autocast_dtype, seed_everything
from autoseg.training.loop import TrainingLoop, TrainingState
from autoseg.training.schedule import PolySchedule

PRETRAIN_FORMAT = "autoseg-pretraining"
TASKS = ("inpainting", SWIN_TASK)


@dataclass
class PretrainingOptions:
    epochs: int = 1000
    iters_per_epoch: int = 250
    time_budget_minutes: float | None = None
    started: float | None = None  # time.perf_counter() at which a time budget starts; None: pretrain's start
    extra_image_folders: list[Path] = field(default_factory=list)
    task: str = "inpainting"
    device: str = "auto"
    num_workers: int = 0
    seed: int | None = None
    resume: bool = False
    initial_lr: float = 1e-2
    progress: bool = True
    amp: bool = True  # autocast on CUDA as training has it (bf16; fp16 + scaler where bf16 is missing); --fp32
    # bf16 on the CPU too. Off by default, unlike training: not measured for pre-training, and in the
    # test suite's five-epoch Swin run its summed loss did not fall under CPU bf16 where float32's did.
    cpu_bf16: bool = False

    def check(self) -> None:
        if self.epochs < 1 or self.iters_per_epoch < 1:
            raise UsageError("epochs and iterations per epoch must be at least 1")
        if self.time_budget_minutes is not None and not 0 < self.time_budget_minutes < math.inf:
            raise UsageError(f"--time-budget must be a positive, finite number of minutes (got "
                             f"{self.time_budget_minutes})")
        if self.task not in TASKS:
            raise UsageError(f"unknown pre-training task '{self.task}'; known: {', '.join(TASKS)}")
        for folder in self.extra_image_folders:
            if not Path(folder).is_dir():
                raise UsageError("--images folder does not exist", folder)


def pretraining_output(roots: Roots, dataset_name: str, configuration: str, architecture: str) -> Path:
    return roots.results / dataset_name / "pretrain" / f"{configuration}__{architecture}"


def head_names(plan, in_channels: int, dimensions: int) -> list[str]:
    """Tensors whose shape depends on the number of outputs: the heads (built on the meta device, no memory)."""
    one, other = (build_shapes_only(functools.partial(build_network, plan, in_channels, outputs, dimensions, False),
                                    torch.device("meta")).state_dict()
                  for outputs in (in_channels, in_channels + 1))
    return sorted(k for k in one if one[k].shape != other[k].shape)


def pretrain(roots: Roots, dataset_name: str, configuration: str, architecture: str | None = None,
             options: PretrainingOptions | None = None, callbacks: list[Any] | None = None) -> Path:
    started = time.perf_counter()  # as in train, a time budget counts the preprocessing of the images too
    options = options or PretrainingOptions()
    options.check()
    plans = load_plans(roots.plans_file(dataset_name))
    config = plans.configuration(configuration)
    arch = plans.architecture(configuration, architecture)
    if options.task == SWIN_TASK and arch.name != "swin_unetr":
        raise UsageError(f"--task {SWIN_TASK} needs -a swin_unetr (its rotation and contrastive heads read the Swin "
                         f"encoder's bottleneck); {arch.name} pre-trains with --task inpainting")
    axes = rotation_axes(arch.patch_size) if options.task == SWIN_TASK else None
    raw = roots.raw_dataset(dataset_name)
    # The dataset's own folders where they hold anything (an empty imagesTs is common); --images folders as given.
    folders = [raw / f for f in ("imagesTr", "imagesTs")
               if (raw / f).is_dir() and any(not p.name.startswith(".") for p in (raw / f).iterdir())]
    folders += list(options.extra_image_folders)
    if not folders:
        raise UsageError(f"no imagesTr/imagesTs under {raw} and no --images folder: nothing to pre-train on")
    output = pretraining_output(roots, dataset_name, configuration, arch.name)
    check_writable_folder(output.parent)
    data_folder = roots.preprocessed_dataset(dataset_name) / f"pretrain_{config.data_identifier}"
    case_ids = preprocess_unlabelled(plans, configuration, folders, data_folder)
    print(f"pretrain: {len(case_ids)} image(s) from {len(folders)} folder(s) -> {data_folder}", flush=True)

    device = select_device(options.device)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
    seed_everything(seed)
    channels = plans.num_input_channels
    network = build_network(arch, channels, channels, config.dimensions, False).to(device)
    heads = head_names(arch, channels, config.dimensions)
    if axes is not None:  # the heads join the network: optimised, saved, restored by --continue
        heads += attach_heads(network, feature_size_of(arch) * LEVEL_WIDTHS[-1])
        model = RotationContrastiveInpainting(network, axes,
                                              views_per_call=training_images_per_call(arch.patch_size, device))
        loss = RotationContrastiveInpaintingLoss(axes)
        if arch.batch_size < 2:
            print(f"pretrain: warning: batch size {arch.batch_size}: the contrastive task has no negatives "
                  "(its loss stays 0); the other two tasks still learn", flush=True)
    else:
        model, loss = MaskedInpainting(network), MaskedReconstructionLoss()
    optimizer = torch.optim.SGD(network.parameters(), lr=options.initial_lr, momentum=0.99, nesterov=True,
                                weight_decay=3e-5)
    # Mixed precision as training has it: plans size the batch for a mixed-precision step (networks/memory.py),
    # which a float32 pre-training step on a GPU would exceed.
    amp_dtype = autocast_dtype(device, TrainingOptions(amp=options.amp, cpu_bf16=options.amp and options.cpu_bf16))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    schedule = PolySchedule(options.initial_lr, 0.9, options.epochs, options.iters_per_epoch)
    state = TrainingState(seed=seed)
    identity = {"plan": {"dataset": dataset_name, "configuration": configuration, "architecture": arch.name,
                         "data_identifier": config.data_identifier, "patch_size": list(arch.patch_size),
                         "batch_size": arch.batch_size, "task": options.task},
                "split": {"cases": case_ids},
                "format": PRETRAIN_FORMAT, "pretrain_head_names": heads}
    latest = output / "checkpoint_latest.pt"
    resuming = options.resume and latest.exists()
    check_writable_folder(output)
    if resuming:  # as training's --continue: weights, optimiser, schedule, epoch, history, RNG
        checkpoint = load_checkpoint(latest)
        check_identity(checkpoint, identity["plan"], identity["split"], latest)
        network.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["grad_scaler"])
        schedule.load_state_dict(checkpoint["scheduler"])
        state.load_state_dict(checkpoint)
        note = set_rng_state(checkpoint["rng"], state.seed + 7919 * state.epoch)
        if note:
            print(f"pretrain: --continue: {note}", flush=True)
        print(f"pretrain: continuing from epoch {state.epoch} of {schedule.total_epochs}", flush=True)
    loop_callbacks: list[Any] = time_budget_callbacks(options.time_budget_minutes, options.started or started,
                                                      state, schedule, resuming, "pretrain", True)
    # The parts first: they join the epoch's entry before the checkpoint and the log are written.
    loop_callbacks += [_LossParts(), CheckpointWriter(output, identity), ProgressWriter(output), _EpochLine()]
    sampler = UnlabelledPatchSampler(data_folder, case_ids, arch.patch_size, arch.batch_size)
    loop = TrainingLoop(network=network, model=model, loss=loss,
                        train_batches=batch_iterator(sampler, options.num_workers, seed + 7919 * state.epoch,
                                                     pin_memory=device.type == "cuda"),
                        val_batches=iter(()), optimizer=optimizer, schedule=schedule, num_classes=1, val_iters=0,
                        device=device, amp_dtype=amp_dtype, scaler=scaler,
                        callbacks=loop_callbacks + list(callbacks or []), state=state, progress=options.progress,
                        # Inpainting is per image, so the CPU may split the batch into calls (call_size.py);
                        # the Swin task splits its 2B views itself, since its contrastive loss pairs them.
                        images_per_call=training_images_per_call(arch.patch_size, device) if axes is None else None)
    try:
        loop.run()
    finally:
        close = getattr(loop.train_batches, "close", None)
        if close:
            close()
    return output


class _LossParts:
    """Adds each task's mean loss to the epoch's entry (``pretrain_losses``) where the loss has parts."""

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        if hasattr(loop.loss, "epoch_means"):
            entry["pretrain_losses"] = loop.loss.epoch_means()


class _EpochLine:
    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        parts = entry.get("pretrain_losses")
        what = ("loss " + " + ".join(f"{name} {value:.4f}" for name, value in parts.items()) + " ="
                if parts else "masked reconstruction loss")
        print(f"pretrain epoch {entry['epoch']}: {what} {entry['train_loss']:.4f}, "
              f"{entry['epoch_seconds']:.1f} s, lr {entry['lr']:.5f}", flush=True)
