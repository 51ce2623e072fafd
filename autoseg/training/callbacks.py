"""What happens around the loop: time budget, checkpoints, the log and plot, the epoch line.

Callbacks run on every rank (some gather from all ranks); only rank 0 writes files.
Order matters: ``TimeBudget`` before ``CheckpointWriter``, so a checkpoint holds the
fitted schedule.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from autoseg.training.checkpoints import rng_state, save_checkpoint
from autoseg.training.distributed import gather
from autoseg.training.progress import draw_progress, write_log

FIT_AFTER_ITERATIONS = 5  # the first is not counted: it pays for warm-up and worker start
# A short budget is cut into at least this many epochs (of at least MIN_ITERS_PER_EPOCH): the log, the
# plot, the best checkpoint and the budget's own refits happen once an epoch.
MIN_EPOCHS, MIN_ITERS_PER_EPOCH = 20, 10
# Under a budget, validation batches per training iteration, at most (nnU-Net: 50 per 250). They only feed
# the pseudo-Dice curve and the best checkpoint, never the weights, so a budget spends less on them.
BUDGET_VALIDATION_SHARE = 0.1
# First guesses, replaced by measurements once an epoch has run: a validation batch against a training
# step (forward only), and the per-epoch writes (checkpoint, log, plot) in seconds.
VALIDATION_COST, EPOCH_WRITES_S = 0.4, 2.0
# The fit aims this far inside the budget. The end lands within about a second either side of the aim at
# a 40 s budget on the 2-core CI machine (the run ended at 39.8, 40.7 and 42.1 s when it aimed at 40):
# the last epoch's writes vary. A budget is a ceiling to the user, so the aim sits below it rather
# than on it.
BUDGET_AIM = 0.975


class TimeBudget:
    """Fits the run to ``minutes`` of wall time from ``start`` to the final checkpoint, decay completed.

    After a few iterations of epoch 0 it sets the epoch length (shorter epochs for short budgets) and
    the number of iterations from the measured step time; after every epoch it refits the number of
    iterations from the measured step, validation and writing times, so the estimate errs by at most
    a fraction of the last epoch. The schedule decays per iteration over whatever length is set.

    A run stopped and continued (``--continue``) keeps its budget: every epoch leaves in the training state
    (so in its checkpoint) the budget, the seconds spent up to that checkpoint, the run's own length and the
    writing time measured; the continued process starts counting from ``spent_s`` and refits after a few
    iterations on its own machine, which may be slower or faster. Work after the last checkpoint, lost, is not
    counted.
    """

    def __init__(self, minutes: float, start: float | None = None, spent_s: float = 0.0,
                 max_iterations: int | None = None, writes_s: float | None = None):
        self.budget_s = minutes * 60
        self.aim_s = BUDGET_AIM * self.budget_s
        self.start = (time.perf_counter() if start is None else start) - spent_s
        self.epoch_iteration_seconds: list[float] = []
        self.step_s: float | None = None
        # A continued run starts from the writing time its first part measured (the first guess is far off for
        # short epochs: 2 s against 0.3 s, and the fit shortens the run until two epochs have been timed).
        self.measured_writes_s: list[float] = [writes_s] if writes_s is not None else []
        self.last_epoch_end: float | None = None
        # The run's own length (--epochs x --iters-per-epoch) caps the fit; None: the schedule's at the first step.
        self.max_iterations = max_iterations

    @classmethod
    def continued(cls, record: dict[str, Any], start: float | None = None,
                  minutes: float | None = None) -> "TimeBudget":
        """The budget of a continued run, from the ``time_budget`` record of its checkpoint (``minutes``:
        a new budget for the whole run, what was spent still counted)."""
        return cls(minutes or float(record["minutes"]), start, float(record["spent_s"]),
                   int(record["max_iterations"]) if record.get("max_iterations") else None,
                   float(record["writes_s"]) if record.get("writes_s") is not None else None)

    @property
    def writes_s(self) -> float:
        """The per-epoch writes (checkpoint, log, plot): the median of those measured, not the last. One slow
        write taken as the norm reserves 1.5x its excess for the writes to come: CI's 40 s run ended 2.4 s early,
        most likely so (tests/test_training.py replays it on a fake clock)."""
        return statistics.median(self.measured_writes_s) if self.measured_writes_s else EPOCH_WRITES_S

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def on_iteration_end(self, loop, iteration: int, loss: float, seconds: float) -> None:
        self.epoch_iteration_seconds.append(seconds)
        if self.max_iterations is None:
            self.max_iterations = loop.schedule.total_iterations
        # The first fit, a few iterations into this process's first epoch: epoch 0 of a new run, or wherever a
        # continued one goes on (its own step time: it may run on another machine).
        epoch = loop.state.epoch
        if (self.step_s is None and iteration == FIT_AFTER_ITERATIONS
                and iteration + 1 < loop.schedule.iterations_in(epoch)):
            self.step_s = gather(_mean(self.epoch_iteration_seconds[1:]))[0]  # every rank follows rank 0
            history = loop.state.history
            finished = loop.state.iterations_run
            if epoch == 0:
                self._shape_epochs(loop, done=iteration + 1)
            validation_s = (history[-1]["validation_seconds"] if history
                            else VALIDATION_COST * self.step_s * loop.val_iters)
            self._refit(loop, finished + iteration + 1, validation_s, finished)
            if loop.rank == 0:
                spent = f", {self.elapsed() / 60:.1f} min spent" if epoch else ""
                print(f"train: time budget {self.budget_s / 60:g} min{spent} at {self.step_s:.2f} s/iteration: "
                      f"{loop.schedule.total_iterations} iterations in {loop.schedule.total_epochs} epoch(s) of "
                      f"{loop.schedule.iters_per_epoch}, {loop.val_iters} validation batches each", flush=True)

    def _shape_epochs(self, loop, done: int) -> None:
        """Epoch length and validation batches for the budget (once, in epoch 0)."""
        schedule = loop.schedule
        share = min(BUDGET_VALIDATION_SHARE, loop.val_iters / schedule.iters_per_epoch)
        estimate = done + (self.aim_s - self.elapsed()) / (self.step_s * (1 + VALIDATION_COST * share))
        if estimate < MIN_EPOCHS * schedule.iters_per_epoch:
            schedule.iters_per_epoch = max(MIN_ITERS_PER_EPOCH, done + 1, int(estimate // MIN_EPOCHS))
        loop.val_iters = max(1, round(share * schedule.iters_per_epoch)) if share > 0 else 0
        # Every rank follows rank 0: each clock started with its own process, and ranks that disagreed on
        # the epoch's length would pair one's gradient all-reduce with the other's validation collectives.
        schedule.iters_per_epoch, loop.val_iters = gather((schedule.iters_per_epoch, loop.val_iters))[0]

    def _refit(self, loop, done: int, validation_s: float, finished: int | None = None) -> None:
        """Total iterations: those done plus what the rest of the budget holds at the measured costs.
        The schedule is told what ran (``finished`` iterations in the epochs finished so far; all ``done``
        unless an epoch is under way): after a short last epoch that more time now extends, the epochs
        added are counted from there."""
        schedule = loop.schedule
        per_epoch_fixed = validation_s + self.writes_s
        remaining = self.aim_s - self.elapsed() - 1.5 * self.writes_s  # this epoch's and the final writes
        more = int(max(0.0, remaining) // (self.step_s + per_epoch_fixed / schedule.iters_per_epoch))
        total = gather(min(done + more, self.max_iterations))[0]  # every rank follows rank 0
        schedule.set_total_iterations(max(total, done), done if finished is None else finished, loop.state.epoch)

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        now = time.perf_counter()
        # This process's first epoch (a new run's epoch 0, a continued one's first): its first step pays for
        # warm-up and worker start, not counted.
        first = self.last_epoch_end is None
        seconds = self.epoch_iteration_seconds[1:] if first else self.epoch_iteration_seconds
        if seconds:  # rank-local measurements: only the refit's total is shared, from rank 0
            self.step_s = _mean(seconds)
        if self.last_epoch_end is not None:  # the interval holds the previous epoch's writes, then this epoch
            train_s = sum(self.epoch_iteration_seconds) + entry["validation_seconds"]
            self.measured_writes_s.append(max(0.0, now - self.last_epoch_end - train_s))
        self.epoch_iteration_seconds = []
        if self.step_s is not None:
            done = loop.state.iterations_run
            before = loop.schedule.total_iterations
            self._refit(loop, done, entry["validation_seconds"])
            if loop.rank == 0 and loop.schedule.total_iterations != before and entry["epoch"] == 0:
                print(f"train: after the first epoch ({self.elapsed():.1f} s in) the budget fits "
                      f"{loop.schedule.total_iterations} iterations", flush=True)
        # For --continue: what the checkpoint written next holds has cost this much, its own writing included.
        loop.state.time_budget = {"minutes": self.budget_s / 60, "spent_s": self.elapsed() + self.writes_s,
                                  "max_iterations": self.max_iterations, "writes_s": self.writes_s}
        self.last_epoch_end = time.perf_counter()


def time_budget_callbacks(minutes: float | None, start: float, state, schedule, resuming: bool, command: str,
                          show: bool) -> list[TimeBudget]:
    """The run's ``TimeBudget``, if it has one: a new run's ``minutes``; a continued run's own budget from its
    checkpoint (``minutes``, if given, the whole run's new budget), what earlier parts spent counted. A
    continued run whose budget is already spent ends where its checkpoint is (``schedule`` shortened)."""
    if not resuming:
        return [TimeBudget(minutes, start)] if minutes else []
    if state.time_budget:
        budget = TimeBudget.continued(state.time_budget, start, minutes)
        if show:
            print(f"{command}: --continue: time budget {budget.budget_s / 60:g} min, "
                  f"{state.time_budget['spent_s'] / 60:.1f} min of it spent up to the checkpoint", flush=True)
        if budget.elapsed() >= budget.aim_s and state.epoch < schedule.total_epochs:
            ran = state.iterations_run
            schedule.set_total_iterations(ran, ran, state.epoch)
            if show:
                print(f"{command}: the budget is spent: the run ends at epoch {state.epoch}", flush=True)
        return [budget]
    if minutes and show:
        print(f"{command}: --time-budget is ignored with --continue: the checkpoint records no budget (the run "
              "started without one, or before autoseg kept them), so the time spent is not known", flush=True)
    return []


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


class EpochReport:
    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        if loop.rank == 0:
            dice = [d if d is None else round(d, 4) for d in entry["pseudo_dice"]]  # None: class in no patch
            print(f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, val loss {entry['val_loss']:.4f}, "
                  f"pseudo Dice {dice}, EMA {entry['pseudo_dice_ema']:.4f}, "
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
                "val_iters": loop.val_iters,  # a time budget's choice, kept by --continue
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
