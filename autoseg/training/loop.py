"""Training one fold: a loop that takes a network, a loss, batch streams and writers.

SGD with Nesterov momentum 0.99, lr 1e-2 with poly decay (exponent 0.9), weight decay
3e-5, gradient norm clipped at 12: nnU-Net's recipe. On CUDA the forward pass runs under
bf16 autocast (fp16 with a gradient scaler where bf16 is missing); on the CPU fp32 unless
``cpu_bf16``. With ``time_budget_minutes`` the number of epochs is fitted after the first
epoch so that the whole poly schedule ends within the budget.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from autoseg.errors import PlanError, UsageError
from autoseg.networks.registry import build_network
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans, save_plans
from autoseg.preprocessing.store import list_finished_cases
from autoseg.training.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from autoseg.training.data import PatchSampler, batch_iterator
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
from autoseg.training.progress import draw_progress, write_log
from autoseg.training.splits import cases_for_fold, load_or_create_splits

EMA_ALPHA = 0.9


@dataclass
class TrainingOptions:
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    time_budget_minutes: float | None = None
    device: str = "auto"
    amp: bool = True
    cpu_bf16: bool = False
    num_workers: int = 2
    seed: int | None = None
    resume: bool = False
    initial_lr: float = 1e-2
    validate_at_end: bool = True
    progress: bool = True


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def autocast_dtype(device: torch.device, options: TrainingOptions) -> torch.dtype | None:
    if device.type == "cuda" and options.amp:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and options.cpu_bf16:
        return torch.bfloat16
    return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train_fold(roots: Roots, dataset_name: str, configuration: str, fold: str, architecture: str | None = None,
               options: TrainingOptions | None = None) -> Path:
    options = options or TrainingOptions()
    rank, world = _init_distributed()
    plans_file = roots.plans_file(dataset_name)
    plans = load_plans(plans_file)
    if plans.has_regions:
        raise PlanError("region-based training is not supported yet; use plain labels", plans_file)
    config = plans.configuration(configuration)
    arch = plans.architecture(configuration, architecture)
    data_folder = roots.preprocessed_dataset(dataset_name) / config.data_identifier
    case_ids = list_finished_cases(data_folder)
    if len(case_ids) < 2:
        raise UsageError(f"{len(case_ids)} preprocessed case(s) in {data_folder}; run "
                         f"`autoseg plan-and-preprocess -d {dataset_name} -c {configuration}` first")
    splits = load_or_create_splits(roots.preprocessed_dataset(dataset_name) / "splits.json", case_ids)
    train_ids, val_ids = cases_for_fold(splits, str(fold), case_ids)
    output = roots.training_output(dataset_name, configuration, arch.name, fold)
    device = select_device(options.device)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
    _seed_everything(seed + 1000 * rank)

    network = build_network(arch, plans.num_input_channels, plans.num_segmentation_heads, config.dimensions, True)
    network.to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=options.initial_lr, momentum=0.99, nesterov=True,
                                weight_decay=3e-5)
    amp_dtype = autocast_dtype(device, options)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = {"epoch": 0, "total_epochs": options.epochs, "history": [], "best_ema": -1.0, "seed": seed}
    if options.resume:
        checkpoint = load_checkpoint(output / "checkpoint_latest.pt")
        network.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("grad_scaler"):
            scaler.load_state_dict(checkpoint["grad_scaler"])
        for key in ("epoch", "total_epochs", "history", "best_ema", "seed"):
            state[key] = checkpoint[key]
        set_rng_state(checkpoint["rng"])
        if rank == 0:
            print(f"train: continuing from epoch {state['epoch']} of {state['total_epochs']}", flush=True)
    elif rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        save_plans(plans, output / "plans.json")
    model = network
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    anisotropic = config.anisotropic_axis is not None and config.dimensions == 3
    per_rank_batch = max(1, arch.batch_size // world)
    train_sampler = PatchSampler(data_folder, train_ids, arch.patch_size, per_rank_batch, True, anisotropic)
    val_sampler = PatchSampler(data_folder, val_ids, arch.patch_size, per_rank_batch, False)
    train_batches = batch_iterator(train_sampler, options.num_workers, seed + 1000 * rank + state["epoch"])
    val_batches = batch_iterator(val_sampler, 0, seed)
    loss_function = DeepSupervisionLoss(DiceCELoss())
    num_classes = plans.num_segmentation_heads

    while state["epoch"] < state["total_epochs"]:
        epoch = state["epoch"]
        start = time.perf_counter()
        lr = options.initial_lr * (1 - epoch / state["total_epochs"]) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        losses = []
        bar = tqdm(range(options.iters_per_epoch), desc=f"epoch {epoch}", leave=False,
                   disable=not (options.progress and rank == 0 and sys.stderr.isatty()))
        for _ in bar:
            image, target = next(train_batches)
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(image)
            loss = loss_function(outputs, target)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        val_loss, dice = _validate(model, val_batches, options.val_iters, loss_function, num_classes, device, amp_dtype)
        seconds = time.perf_counter() - start
        mean_dice = float(np.mean(dice)) if dice else 0.0
        previous = state["history"][-1]["pseudo_dice_ema"] if state["history"] else mean_dice
        ema = EMA_ALPHA * previous + (1 - EMA_ALPHA) * mean_dice if state["history"] else mean_dice
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "pseudo_dice": dice,
                 "pseudo_dice_mean": mean_dice, "pseudo_dice_ema": ema, "epoch_seconds": seconds, "lr": lr}
        state["history"].append(entry)
        if epoch == 0 and options.time_budget_minutes and not options.resume:
            fitted = max(1, int(options.time_budget_minutes * 60 // seconds))
            state["total_epochs"] = fitted
            if rank == 0:
                print(f"train: time budget {options.time_budget_minutes} min fits {fitted} epoch(s) "
                      f"of {seconds:.1f} s", flush=True)
        state["epoch"] = epoch + 1
        if rank == 0:
            print(f"epoch {epoch}: train loss {entry['train_loss']:.4f}, val loss {val_loss:.4f}, pseudo Dice "
                  f"{[round(d, 4) for d in dice]}, {seconds:.1f} s, lr {lr:.5f}", flush=True)
            content = {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                       "grad_scaler": scaler.state_dict() if scaler.is_enabled() else {},
                       "rng": rng_state(), "configuration": configuration, "architecture": arch.name,
                       "fold": str(fold), "patch_size": list(arch.patch_size), **state}
            save_checkpoint(output / "checkpoint_latest.pt", content)
            if ema > state["best_ema"]:
                state["best_ema"] = ema
                content["best_ema"] = ema
                save_checkpoint(output / "checkpoint_best.pt", content)
            write_log(output / "training_log.jsonl", state["history"])
            draw_progress(output / "progress.png", state["history"])
    if rank == 0:
        save_checkpoint(output / "checkpoint_final.pt", {"model": network.state_dict(), "epoch": state["epoch"],
                                                         "configuration": configuration, "architecture": arch.name})
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and options.validate_at_end and str(fold) != "all":
        from autoseg.training.validation import validate_fold

        validate_fold(roots, dataset_name, configuration, arch.name, fold, val_ids, device)
    return output


@torch.no_grad()
def _validate(model, batches, iterations, loss_function, num_classes, device, amp_dtype):
    """Validation loss and pseudo-Dice per foreground class from TP/FP/FN summed over patches."""
    model.eval()
    tp = torch.zeros(num_classes - 1, dtype=torch.float64)
    fp, fn = tp.clone(), tp.clone()
    losses = []
    for _ in range(iterations):
        image, target = next(batches)
        image, target = image.to(device), target.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(image)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        losses.append(float(loss_function(logits, target)))
        predicted = logits.argmax(1)
        valid = target >= 0
        for k in range(1, num_classes):
            p, t = (predicted == k) & valid, target == k
            tp[k - 1] += float((p & t).sum())
            fp[k - 1] += float((p & ~t).sum())
            fn[k - 1] += float((~p & t).sum())
    if dist.is_initialized():
        for tensor in (tp, fp, fn):
            dist.all_reduce(tensor)
    dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()
    return float(np.mean(losses)) if losses else 0.0, dice
