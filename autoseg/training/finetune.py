"""Fine-tuning phases: a learning-rate warm-up and a frozen-encoder phase, as optimiser hooks.

The fine-tuning recipes of STU-Net and nnU-Net's pre-training guide start from pretrained
weights with a short warm-up (the first SGD steps at the full learning rate would wreck
what the pretrained encoder learned while the fresh heads still emit noise), and optionally
train only the new parts for a while before everything is unfrozen.

* ``warmup_epochs`` W: the learning rate ramps linearly from 1/(W*I) to 1 times the
  schedule's value over the first W epochs of I iterations, then follows the schedule.
* ``freeze_encoder_epochs`` F: for the first F epochs the encoder's tensors are not updated
  (no gradient step, no momentum, no weight decay); the decoder and heads train.

Both work through ``optimizer.register_step_pre_hook``/``post_hook``, whatever sets the
learning rate before a step (the schedule per epoch or per iteration): the pre-hook scales
each group's lr for that step and removes the frozen tensors' gradients (SGD skips a tensor
whose ``grad`` is None), the post-hook restores the lr. Gradients are still computed for the
encoder, so DistributedDataParallel sees the same parameters on every step. The epoch and
iteration come from the loop's callbacks, so ``--continue`` resumes the phases where they were.
"""

from __future__ import annotations

from typing import Any

import torch


class FineTuningPhases:
    """A callback: pass it to the loop after constructing it around the loop's optimiser."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule, encoder_parameters: list[torch.nn.Parameter],
                 warmup_epochs: int = 0, freeze_encoder_epochs: int = 0, start_epoch: int = 0):
        self.warmup_epochs = warmup_epochs
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.frozen = {id(p) for p in encoder_parameters}
        self.epoch, self.iteration = start_epoch, 0
        self.schedule = schedule  # read live: a time budget may shorten the epochs
        self.last_factor = 1.0
        self._saved_lr: list[float] = []
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def lr_factor(self) -> float:
        if self.epoch >= self.warmup_epochs:
            return 1.0
        per_epoch = self.schedule.iters_per_epoch
        return min(1.0, (self.epoch * per_epoch + self.iteration + 1) / (self.warmup_epochs * per_epoch))

    def encoder_frozen(self) -> bool:
        return self.epoch < self.freeze_encoder_epochs

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        factor = self.last_factor = self.lr_factor()
        self._saved_lr = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        if self.encoder_frozen():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if id(parameter) in self.frozen:
                        parameter.grad = None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved_lr):
            group["lr"] = lr

    def on_iteration_end(self, loop, iteration: int, loss: float, seconds: float) -> None:
        self.iteration = iteration + 1

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        # The log shows what the phases did to this epoch (its "lr" is the schedule's value).
        entry["lr_factor_last_step"] = self.last_factor
        entry["encoder_frozen"] = self.encoder_frozen()
        self.epoch, self.iteration = loop.state.epoch, 0


def fine_tuning_phases(network: torch.nn.Module, architecture: str, optimizer: torch.optim.Optimizer, schedule,
                       options, start_epoch: int) -> FineTuningPhases:
    """The phases ``options`` ask for (``warmup_epochs``, ``freeze_encoder_epochs``), the encoder by the registry."""
    from autoseg.training.transfer import encoder_names

    encoder = encoder_names(network, architecture)
    parameters = [p for name, p in network.named_parameters() if name in encoder]
    return FineTuningPhases(optimizer, schedule, parameters, options.warmup_epochs, options.freeze_encoder_epochs,
                            start_epoch)
