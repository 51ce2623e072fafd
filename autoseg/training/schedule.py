"""The learning-rate schedule and its length: poly decay, optionally fitted to a time budget.

nnU-Net's recipe: ``lr = initial_lr * (1 - epoch / total_epochs) ** 0.9``, set once per
epoch. With a time budget the schedule's length (``total_epochs``, and
``iters_per_epoch`` when not even one full epoch fits) is chosen from the measured speed
of the first iterations, then refined with the first epoch's real time, so that the poly
decay reaches its end within the budget instead of being cut off half-way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Validation iterations run forward only; a fraction of a training iteration's time.
VALIDATION_COST = 0.4
# Checkpoints, log and plot written every epoch, in seconds (a guess, corrected after epoch 0).
EPOCH_OVERHEAD_S = 2.0


@dataclass
class PolySchedule:
    initial_lr: float = 1e-2
    exponent: float = 0.9
    total_epochs: int = 1000
    iters_per_epoch: int = 250

    def lr(self, epoch: int) -> float:
        return self.initial_lr * max(0.0, 1 - epoch / self.total_epochs) ** self.exponent

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, type(getattr(self, key))(value))

    def fit_from_iterations(self, budget_s: float, seconds_per_iteration: float, val_iters: int) -> None:
        """First estimate, from a few iterations of epoch 0: as many epochs as the budget holds."""
        per_epoch = seconds_per_iteration * (self.iters_per_epoch + VALIDATION_COST * val_iters) + EPOCH_OVERHEAD_S
        if per_epoch <= budget_s:
            self.total_epochs = max(1, int(budget_s // per_epoch))
            return
        # Not even one epoch fits: one shorter epoch, so the run still ends on time.
        usable = max(0.0, budget_s - EPOCH_OVERHEAD_S - seconds_per_iteration * VALIDATION_COST * val_iters)
        self.iters_per_epoch = max(1, int(usable // seconds_per_iteration))
        self.total_epochs = 1

    def fit_from_epoch(self, budget_s: float, epoch_seconds: float) -> None:
        """Refined after epoch 0 with its measured time (workers, validation and writing included)."""
        self.total_epochs = max(1, int(math.floor(budget_s / max(epoch_seconds, 1e-6))))
