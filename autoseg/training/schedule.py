"""The learning-rate schedule and its length: poly decay per iteration, optionally fitted to a time budget.

nnU-Net's recipe is ``lr = initial_lr * (1 - epoch / total_epochs) ** 0.9``, set once per
epoch. Here the same curve is followed per iteration (``1 - iteration / total_iterations``):
for a full run of 1000 epochs the two differ by less than one epoch's step, but a short run
of a few hundred iterations in one or two epochs still decays to zero, where the per-epoch
rule would have kept the initial rate throughout.

The length is ``total_epochs`` epochs of ``iters_per_epoch`` iterations, the last of which
may be shorter (``last_epoch_iters``): a time budget (``autoseg.training.callbacks.TimeBudget``)
sets these from the measured speed so the decay ends on time, not cut off half-way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PolySchedule:
    initial_lr: float = 1e-2
    exponent: float = 0.9
    total_epochs: int = 1000
    iters_per_epoch: int = 250
    last_epoch_iters: int = 0  # 0: the last epoch is a full one
    # Iterations that epochs before the last ran short of ``iters_per_epoch``: a time budget's last epoch,
    # short, after which the budget found time for more (set_total_iterations with ``done``).
    skipped_iterations: int = 0

    def iterations_in(self, epoch: int) -> int:
        """How many training iterations ``epoch`` has."""
        if epoch == self.total_epochs - 1 and self.last_epoch_iters > 0:
            return self.last_epoch_iters
        return self.iters_per_epoch

    @property
    def total_iterations(self) -> int:
        return ((self.total_epochs - 1) * self.iters_per_epoch + self.iterations_in(self.total_epochs - 1)
                - self.skipped_iterations)

    def lr(self, iteration: int) -> float:
        """The learning rate of the ``iteration``-th step of the whole run (0-based)."""
        return self.initial_lr * max(0.0, 1 - iteration / max(self.total_iterations, 1)) ** self.exponent

    def set_total_iterations(self, total: int, done: int | None = None, epochs_done: int = 0) -> None:
        """Make the run ``total`` iterations long, counted from its start, in epochs of ``iters_per_epoch``.

        Without ``done`` all epochs before the last are taken as full ones (as they are while the run
        keeps ``iters_per_epoch``). Given what ran, ``done`` iterations in ``epochs_done`` finished
        epochs, the last of them may have been short (it was the last until then), and the epochs
        added after it are counted from what really ran (during epoch 0, ``epochs_done`` is 0)."""
        if done is not None:
            self.skipped_iterations = max(0, epochs_done * self.iters_per_epoch - done)
        as_if_full = max(1, int(total)) + self.skipped_iterations
        self.total_epochs = -(-as_if_full // self.iters_per_epoch)
        rest = as_if_full - (self.total_epochs - 1) * self.iters_per_epoch
        self.last_epoch_iters = 0 if rest == self.iters_per_epoch else rest

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, type(getattr(self, key))(value))
