"""The CNN U-Net of nnU-Net: per-stage kernels and strides from the plan, conv-InstanceNorm-LeakyReLU.

Built on MONAI's ``DynUNet``. In training mode with deep supervision it returns the
logits of every decoder level except the lowest, full resolution first, at their own
resolution: the loss downsamples the target instead of upsampling each head, as
nnU-Net does, which saves the memory and time of interpolating the heads.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import nn

from autoseg.planning.plans import ArchitecturePlan


class PlannedUNet(nn.Module):
    def __init__(self, plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                 deep_supervision: bool, residual: bool = False):
        super().__init__()
        self.deep_supervision = deep_supervision and len(plan.strides) > 2
        self.net = DynUNet(
            spatial_dims=dimensions,
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=plan.kernel_sizes,
            strides=plan.strides,
            upsample_kernel_size=plan.strides[1:],
            filters=plan.features,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
            deep_supervision=self.deep_supervision,
            deep_supr_num=max(1, len(plan.strides) - 2),
            res_block=residual,
            # Off by default (nnU-Net's bias there is nearly redundant); on for weights mapped from nnU-Net exactly.
            trans_bias=bool(plan.options.get("transposed_conv_bias", False)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net.output_block(self.net.skip_layers(x))
        if self.training and self.deep_supervision:
            # DynUNet fills ``heads`` through hooks during skip_layers; take them as they are.
            return [out] + list(self.net.heads)
        return out


def build_unet(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
               deep_supervision: bool) -> nn.Module:
    return PlannedUNet(plan, in_channels, num_classes, dimensions, deep_supervision)
