"""Fine-tuning phases: a warm-up of the steps and a frozen-encoder phase, as optimiser hooks.

The fine-tuning recipes of STU-Net and nnU-Net's pre-training guide start from pretrained
weights with a short warm-up (the first SGD steps at the full learning rate would wreck
what the pretrained encoder learned while the fresh heads still emit noise), and optionally
train only the new parts for a while before everything is unfrozen.

* ``warmup_epochs`` W: each step's gradient is scaled by a factor that rises linearly from
  1/(W*I) to 1 over the first W epochs of I iterations; after that the schedule alone.
  For plain SGD that is a learning-rate warm-up. With momentum it is not the same, and the
  difference decides: scaling the learning rate leaves the full-size gradients of the warm-up
  in the momentum buffer (0.99 keeps about the last 100), and the network, having barely moved
  while they piled up, takes them at the full rate as the ramp ends. Measured (Hippocampus 2d,
  20 cases, 600 iterations of 30 an epoch, one-epoch ramp, mean validation pseudo-Dice at the
  end, from scratch, ``scripts/bench_warmup.py``): seed 1 without warm-up 0.781, with the
  learning-rate ramp 0.345 (the network predicted background for 9 epochs), with this gradient
  ramp 0.808; seeds 0, 1, 2: 0.811, 0.781, 0.797 without, 0.810, 0.808, 0.820 with it.
* ``freeze_encoder_epochs`` F: for the first F epochs the encoder's tensors are not updated
  (no gradient step, no momentum, no weight decay); the decoder and heads train.

Both work through ``optimizer.register_step_pre_hook``, whatever sets the learning rate before
a step (the schedule per epoch or per iteration): the hook scales each gradient for that step
and removes the frozen tensors' gradients (SGD skips a tensor whose ``grad`` is None).
Gradients are still computed for the encoder, so DistributedDataParallel sees the same
parameters on every step; the scaling comes after clipping and, with float16, after the
gradient scaler has unscaled them. The epoch and iteration come from the loop's callbacks, so
``--continue`` resumes the phases where they were.
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
        optimizer.register_step_pre_hook(self._before_step)

    def warmup_factor(self) -> float:
        if self.epoch >= self.warmup_epochs:
            return 1.0
        per_epoch = self.schedule.iters_per_epoch
        return min(1.0, (self.epoch * per_epoch + self.iteration + 1) / (self.warmup_epochs * per_epoch))

    def encoder_frozen(self) -> bool:
        return self.epoch < self.freeze_encoder_epochs

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        factor = self.last_factor = self.warmup_factor()
        frozen = self.encoder_frozen()
        if factor == 1.0 and not frozen:
            return  # both phases over: every later step of the run
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if frozen and id(parameter) in self.frozen:
                    parameter.grad = None
                elif factor < 1.0:
                    # What enters the momentum buffer is scaled, not the step: see the module's docstring.
                    parameter.grad.mul_(factor)

    def on_gradients(self, loop) -> None:
        """Called by the loop before it clips: a frozen encoder's gradients go now, so that the norm the
        clip scales by is that of what steps (large encoder gradients shrank the decoder's steps)."""
        if self.encoder_frozen():
            for parameter in loop.network.parameters():
                if id(parameter) in self.frozen:
                    parameter.grad = None

    def on_iteration_end(self, loop, iteration: int, loss: float, seconds: float) -> None:
        self.iteration = iteration + 1

    def on_epoch_end(self, loop, entry: dict[str, Any]) -> None:
        # The log shows what the phases did to this epoch (its "lr" is the schedule's value).
        entry["warmup_factor_last_step"] = self.last_factor
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
