"""What happens around the loop: time budget, checkpoints, the log and plot, the epoch line.

Callbacks run on every rank (some gather from all ranks); only rank 0 writes files.
Order matters: ``TimeBudget`` before ``CheckpointWriter``, so a checkpoint holds the
fitted schedule.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from autoseg.training.checkpoints import rng_state, save_checkpoint
from autoseg.training.distributed import gather
from autoseg.training.progress import draw_progress, write_log

FIT_AFTER_ITERATIONS = 5  # the first is not counted: it pays for warm-up and worker start


class TimeBudget:
    """Fits the schedule's length to ``minutes``: after a few iterations, refined after epoch 0."""

    def __init__(self, minutes: float):
        self.budget_s = minutes * 60
        self.start = time.perf_counter()
        self.times: list[float] = []

    def on_iteration_end(self, loop, iteration: int, loss: float, seconds: float) -> None:
        if loop.state.epoch != 0:
            return
        self.times.append(seconds)
        last = min(FIT_AFTER_ITERATIONS, loop.schedule.iters_per_epoch - 1)
        if iteration == last and last >= 1:
            per_iteration = sum(self.times[1:]) / len(self.times[1:])
            per_iteration = gather(per_iteration)[0]  # every rank follows rank 0's schedule
            loop.schedule.fit_from_iterations(self.budget_s - (time.perf_counter() - self.start - sum(self.times)),
                                              per_iteration, loop.val_iters)
            if loop.rank == 0:
                print(f"train: time budget {self.budget_s / 60:g} min at {per_iteration:.2f} s/iteration: "
                      f"{loop.schedule.total_epochs} epoch(s) of {loop.schedule.iters_per_epoch} iterations",
                      flush=True)

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        if entry["epoch"] == 0 and entry["iterations"] == loop.schedule.iters_per_epoch:
            seconds = gather(time.perf_counter() - self.start)[0]
            before = loop.schedule.total_epochs
            loop.schedule.fit_from_epoch(self.budget_s, seconds)
            if loop.rank == 0 and loop.schedule.total_epochs != before:
                print(f"train: the first epoch took {seconds:.1f} s; the budget fits "
                      f"{loop.schedule.total_epochs} epoch(s)", flush=True)


class EpochReport:
    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        if loop.rank == 0:
            print(f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, val loss {entry['val_loss']:.4f}, "
                  f"pseudo Dice {[round(d, 4) for d in entry['pseudo_dice']]}, EMA {entry['pseudo_dice_ema']:.4f}, "
                  f"{entry['epoch_seconds']:.1f} s, lr {entry['lr']:.5f}", flush=True)


class ProgressWriter:
    """``training_log.jsonl`` and ``progress.png``, rewritten atomically every epoch."""

    def __init__(self, output: Path):
        self.output = Path(output)

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        if loop.rank == 0:
            write_log(self.output / "training_log.jsonl", loop.state.history)
            draw_progress(self.output / "progress.png", loop.state.history)


class CheckpointWriter:
    """``checkpoint_latest.pt`` every epoch, ``checkpoint_best.pt`` on a new best EMA, ``checkpoint_final.pt``.

    ``identity`` (plan and split) is stored in every checkpoint, so ``--continue`` can
    refuse one that was written for another configuration, patch or split.
    """

    def __init__(self, output: Path, identity: dict[str, Any]):
        self.output = Path(output)
        self.identity = identity

    def content(self, loop) -> dict[str, Any]:
        states = gather(rng_state())  # collective: every rank's generators, for an exact --continue
        return {"format": "autoseg-checkpoint", "format_version": 1,
                "model": loop.network.state_dict(), "optimizer": loop.optimizer.state_dict(),
                "grad_scaler": loop.scaler.state_dict() if loop.scaler.is_enabled() else {},
                "scheduler": loop.schedule.state_dict(), "total_epochs": loop.schedule.total_epochs,
                **loop.state.state_dict(), "rng": states[0], "rng_per_rank": states, **self.identity}

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        is_best = entry["pseudo_dice_ema"] > loop.state.best_ema  # the same on every rank (all-reduced Dice)
        if is_best:
            loop.state.best_ema = entry["pseudo_dice_ema"]
        content = self.content(loop)
        if loop.rank != 0:
            return
        save_checkpoint(self.output / "checkpoint_latest.pt", content)
        if is_best:
            save_checkpoint(self.output / "checkpoint_best.pt", content)

    def on_train_end(self, loop) -> None:
        content = self.content(loop)
        if loop.rank == 0:
            save_checkpoint(self.output / "checkpoint_final.pt", content)
