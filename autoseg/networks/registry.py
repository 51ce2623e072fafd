"""Architectures by name. Adding one is one file in this folder and one entry below.

Each entry says how to build the network from its ``ArchitecturePlan`` and how the
planner should shape a patch for it. The network contract:

* input ``(B, in_channels, *patch_size)``;
* in ``eval()`` mode one tensor of logits ``(B, num_classes, *patch_size)``;
* in ``train()`` mode with ``deep_supervision=True``, a list of logits, full resolution
  first, then coarser levels (each a whole-number downsampling of the patch); an
  architecture without deep supervision returns one tensor in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from autoseg.networks.topology import UNetTopology, unet_topology
from autoseg.networks.unet import build_unet
from autoseg.planning.plans import ArchitecturePlan

Builder = Callable[[ArchitecturePlan, int, int, int, bool], nn.Module]
TopologyRule = Callable[[list[int], list[float]], UNetTopology]


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    description: str
    build: Builder
    # Maps a candidate patch and spacing to a topology whose patch the architecture accepts.
    topology: TopologyRule = unet_topology
    default_options: dict[str, Any] = field(default_factory=dict)
    # The planner skips an architecture whose ``available()`` is False (say, an optional
    # package missing), and records why.
    available: Callable[[], bool] = lambda: True

    def check_plan(self, plan: ArchitecturePlan, dimensions: int) -> str | None:
        """A reason the plan cannot be built, or None."""
        if not (len(plan.strides) == len(plan.kernel_sizes) == len(plan.features)):
            return "strides, kernel_sizes and features must have one entry per stage"
        if any(len(s) != dimensions for s in plan.strides + plan.kernel_sizes):
            return f"every stride and kernel size must have {dimensions} entries"
        divisor = UNetTopology(plan.patch_size, plan.kernel_sizes, plan.strides, plan.features).divisor()
        bad = [p for p, d in zip(plan.patch_size, divisor) if p % d]
        if bad:
            return f"patch_size {plan.patch_size} must be divisible by {divisor} (the product of the strides)"
        return None


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "unet": ArchitectureSpec("unet", "CNN U-Net (nnU-Net's dynamic U-Net, MONAI DynUNet)", build_unet),
}


def build_network(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                  deep_supervision: bool = True) -> nn.Module:
    from autoseg.errors import PlanError

    if plan.name not in ARCHITECTURES:
        raise PlanError(f"unknown architecture '{plan.name}'; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[plan.name].build(plan, in_channels, num_classes, dimensions, deep_supervision)
