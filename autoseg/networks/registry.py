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

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from autoseg.networks.resenc_unet import RESENC_BLOCKS_PER_STAGE, build_resenc_unet
from autoseg.networks.swin_unetr import (DEFAULT_FEATURE_SIZE, SWIN_FEATURE_SIZES, build_swin_unetr,
                                         check_swin_plan, swin_topology)
from autoseg.networks.topology import UNetTopology, unet_topology
from autoseg.networks.umamba import UMAMBA_BLOCKS_PER_STAGE, build_umamba_bot, build_umamba_enc
from autoseg.networks.unet import build_unet
from autoseg.networks.xlstm_unet import XLSTM_BLOCKS_PER_STAGE, build_xlstm_unet
from autoseg.planning.plans import ArchitecturePlan

Builder = Callable[[ArchitecturePlan, int, int, int, bool], nn.Module]
TopologyRule = Callable[..., UNetTopology]  # (patch, spacing, **choice) -> topology
PlanCheck = Callable[[ArchitecturePlan, int], "str | None"]


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
    # Constraints beyond the U-Net ones (say, a patch multiple of 32); returns a reason or None.
    extra_check: PlanCheck | None = None
    # Options the planner chooses between, most preferred first (say, Swin's feature_size): each
    # is passed to ``topology`` as keywords and stored in the plan's options. See plan_architecture.
    option_choices: tuple[dict[str, Any], ...] = ({},)
    # Tensor-name prefixes of the encoder: what --freeze-encoder-epochs freezes and what the
    # --pretrained threshold counts (autoseg.training.transfer).
    encoder_prefixes: tuple[str, ...] = ()
    # The dimensions (2, 3) whose networks predict on the CPU in channels-last memory (networks/memory_format.py):
    # where ``scripts/bench_memory_format.py`` measured it faster. Swin UNETR and xLSTM-UNet gained nothing
    # (their attention and mLSTM layers reshape to sequences), ResEnc's 2D calls were slower. Training follows
    # it for 3D only (``memory_format.runs_channels_last``: ``--training`` found 2D steps slower).
    cpu_channels_last: tuple[int, ...] = ()

    def check_plan(self, plan: ArchitecturePlan, dimensions: int) -> str | None:
        """A reason the plan cannot be built, or None."""
        if not (len(plan.strides) == len(plan.kernel_sizes) == len(plan.features)):
            return "strides, kernel_sizes and features must have one entry per stage"
        if any(len(s) != dimensions for s in plan.strides + plan.kernel_sizes):
            return f"every stride and kernel size must have {dimensions} entries"
        # What the networks take for granted: a first stage at full resolution (the loss would quietly shrink
        # the target to a strided one's output, and prediction then fail on the shapes), odd kernels (padding
        # k // 2 keeps the shape), positive widths.
        if any(s != 1 for s in plan.strides[0]):
            return f"the first stage's stride must be 1 on every axis (got {plan.strides[0]})"
        if any(s not in (1, 2) for stride in plan.strides for s in stride):
            return "strides must be 1 or 2"
        if any(k < 1 or k % 2 == 0 for kernel in plan.kernel_sizes for k in kernel):
            return "kernel sizes must be odd and positive"
        if any(f < 1 for f in plan.features):
            return "features must be positive"
        divisor = UNetTopology(plan.patch_size, plan.kernel_sizes, plan.strides, plan.features).divisor()
        bad = [p for p, d in zip(plan.patch_size, divisor) if p % d]
        if bad:
            return f"patch_size {plan.patch_size} must be divisible by {divisor} (the product of the strides)"
        return self.extra_check(plan, dimensions) if self.extra_check else None


_UNET_ENCODER = ("net.input_block.", "net.downsamples.", "net.bottleneck.")
_RESENC_ENCODER = ("stem.", "encoder.", "mixers.")  # also U-Mamba's and xLSTM-UNet's (their mixers sit in it)
# The Swin transformer and the residual blocks on its input and hidden states (encoder1-4, encoder10).
_SWIN_ENCODER = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
_UMAMBA_OPTIONS = {"blocks_per_stage": UMAMBA_BLOCKS_PER_STAGE, "d_state": 16, "d_conv": 4, "expand": 2}

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "unet": ArchitectureSpec("unet", "CNN U-Net (nnU-Net's dynamic U-Net, MONAI DynUNet)", build_unet,
                             encoder_prefixes=_UNET_ENCODER, cpu_channels_last=(2, 3)),
    "resenc_unet": ArchitectureSpec("resenc_unet", "Residual-encoder U-Net (nnU-Net ResEnc, 1,3,4,6,6,... blocks)",
                                    build_resenc_unet,
                                    default_options={"blocks_per_stage": RESENC_BLOCKS_PER_STAGE},
                                    encoder_prefixes=_RESENC_ENCODER, cpu_channels_last=(3,)),
    "swin_unetr": ArchitectureSpec("swin_unetr", "Swin UNETR (MONAI), patch multiple of 32, no deep supervision",
                                   build_swin_unetr, topology=swin_topology,
                                   default_options={"feature_size": DEFAULT_FEATURE_SIZE},
                                   extra_check=check_swin_plan,
                                   option_choices=tuple({"feature_size": f} for f in SWIN_FEATURE_SIZES),
                                   available=lambda: importlib.util.find_spec("einops") is not None,
                                   encoder_prefixes=_SWIN_ENCODER),
    "umamba_bot": ArchitectureSpec("umamba_bot", "U-Mamba Bot: residual U-Net, Mamba layer at the bottleneck",
                                   build_umamba_bot, default_options=_UMAMBA_OPTIONS,
                                   encoder_prefixes=_RESENC_ENCODER, cpu_channels_last=(2, 3)),
    "umamba_enc": ArchitectureSpec("umamba_enc", "U-Mamba Enc: residual U-Net, Mamba layer after every encoder stage",
                                   build_umamba_enc, default_options=_UMAMBA_OPTIONS,
                                   encoder_prefixes=_RESENC_ENCODER),
    "xlstm_unet": ArchitectureSpec("xlstm_unet", "xLSTM-UNet: residual U-Net, Vision-LSTM (mLSTM) blocks per encoder stage",
                                   build_xlstm_unet,
                                   default_options={"blocks_per_stage": XLSTM_BLOCKS_PER_STAGE, "vil_blocks": 2,
                                                    "heads": 4, "expand": 2, "chunk_size": 64},
                                   encoder_prefixes=_RESENC_ENCODER),
}


def build_network(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                  deep_supervision: bool = True) -> nn.Module:
    from autoseg.errors import PlanError

    if plan.name not in ARCHITECTURES:
        raise PlanError(f"unknown architecture '{plan.name}'; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[plan.name].build(plan, in_channels, num_classes, dimensions, deep_supervision)
