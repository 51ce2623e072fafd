"""The training loop: epochs of SGD steps and a validation pass, everything else in callbacks.

The loop is handed its parts (network, loss, batch streams, optimiser, schedule) and a
list of callbacks (time budget, checkpoints, log and plot, the epoch line), so a variant
is a different argument, not a subclass. Wiring it for one fold of a plan is
``autoseg.training.fold.train_fold``.

One step is nnU-Net's: forward under autocast (bf16 on CUDA, fp16 with a gradient scaler
where bf16 is missing, CPU fp32 unless asked), Dice + CE with deep supervision,
gradient norm clipped at 12, SGD. Validation accumulates TP/FP/FN per foreground class
over all validation batches (and ranks) for the pseudo-Dice; its exponential moving
average (alpha 0.9) picks the best checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from autoseg.networks.call_size import call_in_parts
from autoseg.training.distributed import all_reduce_sum
from autoseg.training.loss import region_masks
from autoseg.training.schedule import PolySchedule

EMA_ALPHA = 0.9
GRADIENT_CLIP = 12.0


@dataclass
class TrainingState:
    """What changes while training runs, besides weights and optimiser (saved in checkpoints)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_ema: float = -1.0
    seed: int = 0
    # A time budget's minutes, the seconds spent up to the last epoch's checkpoint, the run's own length and
    # the measured writing time (callbacks.TimeBudget): what --continue needs to keep the budget. None: no budget.
    time_budget: dict[str, Any] | None = None

    @property
    def iterations_run(self) -> int:
        """Training iterations of the epochs finished so far (a time budget's last epoch may have been short)."""
        return sum(entry["iterations"] for entry in self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best_ema": self.best_ema, "seed": self.seed,
                "time_budget": self.time_budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.best_ema, self.seed = float(state["best_ema"]), int(state["seed"])
        self.time_budget = state.get("time_budget")  # checkpoints before the field hold none


class Callback(Protocol):
    """Any subset of these methods; the loop calls those a callback has, in list order."""

    def on_iteration_end(self, loop: "TrainingLoop", iteration: int, loss: float, seconds: float) -> None: ...

    def on_epoch_end(self, loop: "TrainingLoop", entry: dict[str, Any]) -> None: ...

    def on_train_end(self, loop: "TrainingLoop") -> None: ...


@dataclass
class TrainingLoop:
    network: nn.Module  # the network whose weights are saved
    model: nn.Module  # what runs forward: the network, or its DistributedDataParallel wrapper
    loss: nn.Module
    train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    val_batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    schedule: PolySchedule
    num_classes: int
    val_iters: int = 50
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    callbacks: list[Any] = field(default_factory=list)
    state: TrainingState = field(default_factory=TrainingState)
    rank: int = 0
    progress: bool = True
    # Region-based labels: the label values of each (sigmoid) output; None for softmax classes.
    regions: list[list[int]] | None = None
    last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    # The batch goes through the network in calls of this many images (None: all at once). On the
    # CPU small calls run faster (networks/call_size.py); the outputs are joined before the loss, so
    # the batch Dice, the loss and the gradients are the whole batch's (instance normalisation is
    # per image). Not with DistributedDataParallel, which expects one forward per backward.
    images_per_call: int | None = None

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)

    def run(self) -> None:
        while self.state.epoch < self.schedule.total_epochs:
            self.run_epoch()
        self._call("on_train_end")

    def run_epoch(self) -> dict[str, Any]:
        epoch = self.state.epoch
        start = time.perf_counter()
        done_before = self.state.iterations_run  # iterations of the whole run so far
        first_lr = self.schedule.lr(done_before)
        self.model.train()
        losses = []
        show = self.progress and self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=self.schedule.iterations_in(epoch), desc=f"epoch {epoch}", leave=False, disable=not show)
        iteration, data_wait = 0, 0.0
        while iteration < self.schedule.iterations_in(epoch):  # a time budget may change it while the epoch runs
            tick = time.perf_counter()
            for group in self.optimizer.param_groups:  # poly decay per iteration (see schedule.py)
                group["lr"] = self.schedule.lr(done_before + iteration)
            image, target = next(self.train_batches)
            data_wait += time.perf_counter() - tick  # the model waiting for augmentation: should stay near 0
            self.last_batch = (image, target)
            losses.append(self.train_step(image, target))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            self._call("on_iteration_end", iteration, losses[-1], time.perf_counter() - tick)
            iteration += 1
        bar.close()
        validation_start = time.perf_counter()
        val_loss, dice = self.validate()
        history = self.state.history
        present = [d for d in dice if d is not None]
        # No class in any patch: no news, so the previous EMA stands in (0 before the first).
        mean_dice = float(np.mean(present)) if present else (history[-1]["pseudo_dice_ema"] if history else 0.0)
        ema = EMA_ALPHA * history[-1]["pseudo_dice_ema"] + (1 - EMA_ALPHA) * mean_dice if history else mean_dice
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "pseudo_dice": dice,
                 "pseudo_dice_mean": mean_dice, "pseudo_dice_ema": ema, "lr": first_lr, "iterations": iteration,
                 "data_wait_seconds": data_wait,
                 "validation_seconds": time.perf_counter() - validation_start, "epoch_seconds": time.perf_counter() - start}
        history.append(entry)
        self.state.epoch = epoch + 1
        self._call("on_epoch_end", entry)
        return entry

    def train_step(self, image: torch.Tensor, target: torch.Tensor) -> float:
        image = image.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.forward(image)
        loss = self.loss(outputs, target)  # in fp32: the loss casts the logits
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self._call("on_gradients")  # before the clip (a frozen encoder's gradients leave: finetune.py)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRADIENT_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def forward(self, image: torch.Tensor):
        """The model's output(s) for ``image``, computed ``images_per_call`` images at a time."""
        return call_in_parts(self.model, image, self.images_per_call)

    @torch.no_grad()
    def validate(self) -> tuple[float, list[float]]:
        """Validation loss and pseudo-Dice per foreground class from TP/FP/FN summed over batches and ranks."""
        self.model.eval()
        num_foreground = len(self.regions) if self.regions else self.num_classes - 1
        # TP, FP, FN as integers on the loop's device: no host sync per batch and class, the
        # collective runs on the device's backend (NCCL), and int64 exists on every device (MPS has no float64).
        counts = torch.zeros(3, num_foreground, dtype=torch.int64, device=self.device)
        losses = []
        for _ in range(self.val_iters):
            image, target = next(self.val_batches)
            image, target = image.to(self.device), target.to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.forward(image)
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits
            losses.append(float(self.loss(logits, target)))
            valid = target >= 0
            if self.regions:
                predicted_masks = logits > 0  # sigmoid > 0.5
                target_masks = region_masks(target, self.regions) > 0
            else:
                predicted = logits.argmax(1)
                predicted_masks = torch.stack([predicted == k for k in range(1, self.num_classes)], 1)
                target_masks = torch.stack([target == k for k in range(1, self.num_classes)], 1)
            for k in range(num_foreground):
                p, t = predicted_masks[:, k] & valid, target_masks[:, k]
                counts[0, k] += (p & t).sum()
                counts[1, k] += (p & ~t).sum()
                counts[2, k] += (~p & t).sum()
        all_reduce_sum(counts)
        tp, fp, fn = counts.cpu().double()
        # A class in none of the validation patches (and predicted nowhere) has no Dice: None, left out of
        # the mean (nnU-Net's nanmean), not 0, which with a budget's one or two batches per epoch made the
        # mean, its EMA and so checkpoint_best.pt follow which classes the patches happened to hold.
        dice = [None if total == 0 else float(2 * overlap / total) for overlap, total in zip(tp, 2 * tp + fp + fn)]
        return (float(np.mean(losses)) if losses else 0.0), dice

    def _call(self, method: str, *args) -> None:
        for callback in self.callbacks:
            function = getattr(callback, method, None)
            if function is not None:
                function(self, *args)
