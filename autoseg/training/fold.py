"""``train_fold``: one fold of a planned configuration, from preprocessed cases to checkpoints.

    from autoseg.paths import Roots
    from autoseg.training import TrainingOptions, train_fold

    output = train_fold(Roots.resolve(), "Dataset004_Hippocampus", "3d_fullres", "0",
                        options=TrainingOptions(epochs=50, time_budget_minutes=30))

This wires the parts (plan, split, network, loss, patch streams, optimiser, schedule,
callbacks) into ``TrainingLoop``; each part lives in its own module. The output folder,
``Roots.training_output(dataset, configuration, architecture, fold)``, receives the
checkpoints, ``training_log.jsonl``, ``progress.png`` and copies of ``plans.json`` and
``dataset.json`` (what the predictor needs besides the weights).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from autoseg.errors import UsageError
from autoseg.inference.model import load_network_weights
from autoseg.networks.call_size import training_images_per_call
from autoseg.networks.memory_format import ChannelsLast, runs_channels_last
from autoseg.networks.precision import cpu_has_native_bf16, cuda_autocast_dtype
from autoseg.networks.registry import build_network
from autoseg.paths import Roots
from autoseg.planning.planner import preprocessing_digest
from autoseg.planning.plans import load_plans, save_plans
from autoseg.preprocessing.store import list_finished_cases
from autoseg.records import check_writable_folder, copy_file_atomic
from autoseg.training.callbacks import CheckpointWriter, EpochReport, ProgressWriter, time_budget_callbacks
from autoseg.training.checkpoints import check_identity, load_checkpoint, set_rng_state
from autoseg.training.data import PatchSampler, batch_iterator
from autoseg.training.distributed import barrier, init_distributed, select_device
from autoseg.training.loop import TrainingLoop, TrainingState
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss
from autoseg.training.memory_guard import check_training_memory
from autoseg.training.schedule import PolySchedule
from autoseg.training.splits import DEFAULT_GROUP_PATTERN, cases_for_fold, load_or_create_splits
from autoseg.training.workers import batch_bytes, default_workers, fit_shared_memory


@dataclass
class TrainingOptions:
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    time_budget_minutes: float | None = None
    device: str = "auto"  # auto | cuda | cpu | mps
    amp: bool = True  # autocast: bf16 on CUDA (fp16 + gradient scaler where bf16 is missing) and native-bf16 CPUs
    cpu_bf16: bool | None = None  # bf16 autocast on the CPU; None: where the CPU has native bf16 units
    num_workers: int | None = None  # augmentation processes; None: workers.default_workers; 0: in-process
    seed: int | None = None
    resume: bool = False
    initial_lr: float = 1e-2
    batch_size: int | None = None  # None: the plan's, but at most CPU_3D_BATCH for 3D on the CPU (training_batch_size)
    validate_at_end: bool = True
    save_probabilities: bool = False  # validation also keeps each case's class probabilities (CASE.npz)
    progress: bool = True
    group_pattern: str = DEFAULT_GROUP_PATTERN  # cases whose first group matches share a fold
    started: float | None = None  # time.perf_counter() at which a time budget starts; None: train_fold's start
    # Transfer learning (autoseg.training.transfer, autoseg.training.finetune)
    pretrained: str | None = None  # a checkpoint to start from: autoseg (training, pre-training), state dict, nnU-Net v2
    allow_partial: bool = False  # accept a --pretrained that loads less than half of the encoder
    warmup_epochs: int = 0  # linear warm-up of the steps over this many epochs (autoseg.training.finetune)
    freeze_encoder_epochs: int = 0  # the encoder is not updated for this many epochs

    def check(self) -> None:
        if self.epochs < 1 or self.iters_per_epoch < 1 or self.val_iters < 0:
            raise UsageError("epochs and iterations per epoch must be at least 1, validation iterations at least 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError("--num-workers must be at least 0")
        if self.time_budget_minutes is not None and not 0 < self.time_budget_minutes < math.inf:
            # NaN compared false everywhere and ended the run after six iterations; inf overflowed.
            raise UsageError(f"--time-budget must be a positive, finite number of minutes (got "
                             f"{self.time_budget_minutes})")
        if self.warmup_epochs < 0 or self.freeze_encoder_epochs < 0:
            raise UsageError("--warmup-epochs and --freeze-encoder-epochs must be at least 0")
        if self.freeze_encoder_epochs and not self.pretrained:
            raise UsageError("--freeze-encoder-epochs needs --pretrained (a random encoder would stay random)")


def autocast_dtype(device: torch.device, options: TrainingOptions) -> torch.dtype | None:
    if device.type == "cuda" and options.amp:
        return cuda_autocast_dtype(device)
    if device.type == "cpu":
        # Native bf16 (AVX-512 BF16, AMX) makes a step about twice as fast (scripts/bench_train.py,
        # scripts/bench_accuracy.py); emulated bf16 would be slower than float32.
        wanted = options.cpu_bf16 if options.cpu_bf16 is not None else options.amp and cpu_has_native_bf16()
        return torch.bfloat16 if wanted else None
    return None


# nnU-Net's smallest batch, which it plans for most 3D datasets. On a GPU a larger planned batch is
# parallel work that costs little more time per step; on the CPU every image costs the same time
# however the batch is called (networks/call_size.py), so a larger batch only buys fewer, larger
# steps. Measured on Hippocampus 3d_fullres fold 1 (planned batch 7), 17.5 minutes of training on
# this 2-core CPU, bf16: batch 7 did 689 iterations and scored 0.840 mean Dice on the 40 validation
# cases, batch 2 did 2245 and scored 0.868 (README, "Training"; fold 0: "Learning per unit of
# time"). 2D configurations keep the plan's batch: not measured.
CPU_3D_BATCH = 2


def training_batch_size(planned: int, dimensions: int, device: torch.device, requested: int | None = None) -> int:
    """The batch one optimiser step takes: ``requested`` if given, else the plan's, capped at CPU_3D_BATCH
    for 3D configurations on the CPU."""
    if requested is not None:
        return requested
    if device.type == "cpu" and dimensions == 3:
        return min(planned, CPU_3D_BATCH)
    return planned


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_fold(roots: Roots, dataset_name: str, configuration: str, fold: int | str, architecture: str | None = None,
               options: TrainingOptions | None = None, callbacks: list[Any] | None = None) -> Path:
    """Train one fold (``0``-``4`` or ``all``); returns the output folder. ``callbacks`` run after the built-in ones."""
    started = time.perf_counter()  # a time budget counts from here: loading and worker start-up are in it
    options = options or TrainingOptions()
    options.check()
    fold = str(fold)
    owns_group = not dist.is_initialized()  # a group the caller made is the caller's to end
    rank, world = init_distributed(options.device)
    plans_file = roots.plans_file(dataset_name)
    plans = load_plans(plans_file)
    config = plans.configuration(configuration)
    arch = plans.architecture(configuration, architecture)
    data_folder = roots.preprocessed_dataset(dataset_name) / config.data_identifier
    case_ids = list_finished_cases(data_folder)
    if len(case_ids) < 2:
        raise UsageError(f"{len(case_ids)} preprocessed case(s) in {data_folder}; run "
                         f"`autoseg plan-and-preprocess -d {dataset_name} -c {configuration}` first")
    splits = load_or_create_splits(roots.preprocessed_dataset(dataset_name) / "splits.json", case_ids,
                                   options.group_pattern)
    train_ids, val_ids = cases_for_fold(splits, fold, case_ids)
    output = roots.training_output(dataset_name, configuration, arch.name, fold)
    device = select_device(options.device)
    latest = output / "checkpoint_latest.pt"
    # Killed before the first epoch ended: nothing is lost by starting again (the same run, with --seed).
    resuming = options.resume and latest.exists()
    checkpoint = load_checkpoint(latest) if resuming else None
    batch_size = training_batch_size(arch.batch_size, config.dimensions, device, options.batch_size)
    if checkpoint is not None and options.batch_size is None:
        # A run continues at the batch it started with (say, begun on the CPU, continued on a GPU).
        batch_size = checkpoint.get("plan", {}).get("batch_size", batch_size)
    if batch_size != arch.batch_size and rank == 0:
        why = "--batch-size" if options.batch_size is not None else (
            "as the checkpoint was" if checkpoint is not None else "on the CPU, where a larger batch is not faster")
        print(f"train: batch {batch_size} ({why}; the plan's is {arch.batch_size})", flush=True)
    # The samplers check every case's arrays: a broken case stops the run here, before anything is written.
    anisotropic_axis = config.anisotropic_axis if config.dimensions == 3 else None
    # The batch split across ranks (7 on 2 ranks: 4 + 3; at least one each), and where each rank's samples
    # lie in it: foreground is forced by the place in the whole batch, so a batch of 2 on 2 ranks forces
    # one sample (rank 1's), not every rank's only one.
    rank_batches = [max(1, batch_size // world + (1 if r < batch_size % world else 0)) for r in range(world)]
    per_rank_batch = rank_batches[rank]
    place_in_batch = (sum(rank_batches[:rank]), sum(rank_batches))
    digest = preprocessing_digest(plans, configuration)  # the store must hold what plans.json now says
    train_sampler = PatchSampler(data_folder, train_ids, arch.patch_size, per_rank_batch, True, anisotropic_axis,
                                 digest, place_in_batch, plans.masked_channels)
    val_sampler = PatchSampler(data_folder, val_ids, arch.patch_size, per_rank_batch, False, plans_digest=digest,
                               place_in_batch=place_in_batch, masked_channels=plans.masked_channels)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
    seed_everything(seed + 1000 * rank)  # every rank its own patches

    network = build_network(arch, plans.num_input_channels, plans.num_segmentation_heads, config.dimensions, True)
    network.to(device)
    # 3D networks train in channels-last memory on the CPU (networks/memory_format.py; the wrapper converts
    # the network in place, before the optimiser takes its parameters): ``scripts/bench_memory_format.py
    # --training`` timed an ACDC 3d_fullres U-Net step at 0.86x (a first A/B: 0.73x; U-Mamba Bot 0.76x, ResEnc
    # 0.95x), Hippocampus's 0.95x, and ACDC 2d's at 1.06x, so 2D stays. Not under torchrun: DDP's gradient
    # buckets are laid out for the default layout.
    channels_last = world == 1 and runs_channels_last(arch.name, config.dimensions, device, training=True)
    forward_model = ChannelsLast(network, config.dimensions) if channels_last else network
    optimizer = torch.optim.SGD(network.parameters(), lr=options.initial_lr, momentum=0.99, nesterov=True,
                                weight_decay=3e-5)
    amp_dtype = autocast_dtype(device, options)
    check_training_memory(plans, plans_file, configuration, arch, per_rank_batch, device, amp_dtype, world)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    schedule = PolySchedule(options.initial_lr, 0.9, options.epochs, options.iters_per_epoch)
    state = TrainingState(seed=seed)
    val_iters = options.val_iters
    identity = {"plan": {"dataset": dataset_name, "configuration": configuration, "architecture": arch.name,
                         "data_identifier": config.data_identifier, "patch_size": list(arch.patch_size),
                         "batch_size": batch_size, "num_classes": plans.num_segmentation_heads},
                "split": {"fold": fold, "train": train_ids, "val": val_ids}}
    if options.resume and not resuming and rank == 0:
        print(f"train: --continue: no {latest.name} yet; starting from the beginning", flush=True)
    transfer = None
    if options.pretrained and not resuming:  # refused (below the encoder threshold) before anything is written
        from autoseg.training.transfer import transfer_weights

        transfer = transfer_weights(network, options.pretrained, arch.name, options.allow_partial, rank == 0)
    elif options.pretrained and rank == 0:
        print("train: --pretrained is ignored with --continue (the weights come from the checkpoint)", flush=True)
    if rank == 0:
        check_writable_folder(output)
    if checkpoint is not None:
        check_identity(checkpoint, identity["plan"], identity["split"], latest)
        load_network_weights(network, checkpoint["model"], latest)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("grad_scaler"):
            scaler.load_state_dict(checkpoint["grad_scaler"])
        schedule.load_state_dict(checkpoint["scheduler"])
        # Validation batches per epoch as the run chose them (a time budget shortens them with its epochs);
        # checkpoints older than the field hold none.
        val_iters = int(checkpoint.get("val_iters", options.val_iters))
        if val_iters != options.val_iters and rank == 0:
            print(f"train: --continue: {val_iters} validation batches per epoch, as the run chose them "
                  f"(not --val-iters {options.val_iters})", flush=True)
        state.load_state_dict(checkpoint)
        per_rank = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
        fresh_seed = state.seed + 1000 * rank + 7919 * state.epoch
        if rank < len(per_rank):
            note = set_rng_state(per_rank[rank], fresh_seed)
            if note and rank == 0:
                print(f"train: --continue: {note}", flush=True)
        else:  # more ranks than when saved: a fresh, distinct stream for the new ones
            seed_everything(fresh_seed)
        if rank == 0:
            print(f"train: continuing from epoch {state.epoch} of {schedule.total_epochs}", flush=True)
    elif rank == 0:
        _write_model_files(roots, dataset_name, plans, output)
        if transfer is not None:
            transfer.save(output)  # transfer.json / transfer.txt: the table beside the fold
    barrier()

    model = forward_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    workers = default_workers(device.type) if options.num_workers is None else options.num_workers
    workers, note = fit_shared_memory(workers, batch_bytes(per_rank_batch, plans.num_input_channels, arch.patch_size))
    if note and rank == 0:
        print(f"train: note: {note}", flush=True)
    loop_callbacks: list[Any] = time_budget_callbacks(options.time_budget_minutes, options.started or started,
                                                      state, schedule, resuming, "train", rank == 0)
    if options.warmup_epochs or options.freeze_encoder_epochs:
        from autoseg.training.finetune import fine_tuning_phases

        loop_callbacks.append(fine_tuning_phases(network, arch.name, optimizer, schedule, options, state.epoch))
    loop_callbacks += [CheckpointWriter(output, identity), ProgressWriter(output), EpochReport()]
    loop = TrainingLoop(
        network=network, model=model,
        loss=DeepSupervisionLoss(RegionDiceBCELoss(plans.regions) if plans.has_regions else DiceCELoss()),
        # The run's own seed (a continued run's is the checkpoint's, not a fresh one drawn without --seed).
        train_batches=batch_iterator(train_sampler, workers, state.seed + 1000 * rank + 7919 * state.epoch,
                                     pin_memory=device.type == "cuda"),
        val_batches=batch_iterator(val_sampler, 0, state.seed), optimizer=optimizer, schedule=schedule,
        num_classes=plans.num_segmentation_heads, val_iters=val_iters, device=device, amp_dtype=amp_dtype,
        scaler=scaler, callbacks=loop_callbacks + list(callbacks or []), state=state, rank=rank,
        progress=options.progress, regions=plans.regions if plans.has_regions else None,
        images_per_call=training_images_per_call(arch.patch_size, device) if world == 1 else None)
    try:
        loop.run()
    finally:
        close = getattr(loop.train_batches, "close", None)
        if close:
            close()  # stops the worker processes
    barrier()
    if owns_group and dist.is_initialized():
        # The group's work ends with training: rank 0's end-of-fold validation needs no collective, and the
        # other ranks would otherwise sit in NCCL's teardown (which waits for every rank) until it ends.
        dist.destroy_process_group()
    if rank == 0 and options.validate_at_end and fold != "all":
        # ---- HOOK: final validation of the fold with the predictor (sliding window on the original images) ----
        from autoseg.training.validation import validate_fold

        validate_fold(roots, dataset_name, configuration, arch.name, fold, val_ids, device,
                      options.save_probabilities)
    return output


def _write_model_files(roots: Roots, dataset_name: str, plans, output: Path) -> None:
    """plans.json and dataset.json beside the checkpoints (fold folder and model folder): what prediction reads."""
    output.mkdir(parents=True, exist_ok=True)
    dataset_json = roots.preprocessed_dataset(dataset_name) / "dataset.json"
    for folder in (output, output.parent):
        save_plans(plans, folder / "plans.json")
        if dataset_json.is_file():
            copy_file_atomic(dataset_json, folder / "dataset.json")
