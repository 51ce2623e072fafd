"""The CNN U-Net of nnU-Net: per-stage kernels and strides from the plan, conv-InstanceNorm-LeakyReLU.

Built on MONAI's ``DynUNet``. In training mode with deep supervision it returns the
logits of every decoder level except the lowest, full resolution first, at their own
resolution: the loss downsamples the target instead of upsampling each head, as
nnU-Net does, which saves the memory and time of interpolating the heads.

One change to DynUNet: its decoder convolutions at a level use the kernel of the level
below (``kernel_size[1:]``), nnU-Net's use the level's own kernel, the one its encoder
stage has. They differ where neighbouring stages' kernels differ (anisotropic plans):
ACDC's full-resolution decoder would convolve 3x3x3 across slices 10 mm apart where
nnU-Net (and the plan's own encoder) convolves 1x3x3, three times the work at the
network's most expensive level, and nnU-Net's weights would not fit it.
"""

from __future__ import annotations

import torch
from monai.networks.blocks.dynunet_block import UnetUpBlock
from monai.networks.nets import DynUNet
from monai.networks.nets.dynunet import DynUNetSkipLayer
from torch import nn

from autoseg.planning.plans import ArchitecturePlan


class _LevelKernelDynUNet(DynUNet):
    """DynUNet whose decoder convolution at each level has that level's kernel, as nnU-Net's (see above)."""

    def get_upsamples(self):
        # DynUNet.get_upsamples with one change: kernel_size[:-1] (the output level's) for kernel_size[1:].
        inp, out = self.filters[1:][::-1], self.filters[:-1][::-1]
        strides, kernel_size = self.strides[1:][::-1], self.kernel_size[:-1][::-1]
        upsample_kernel_size = self.upsample_kernel_size[::-1]
        return self.get_module_list(inp, out, kernel_size, strides, UnetUpBlock, upsample_kernel_size,
                                    trans_bias=self.trans_bias)


class PlannedUNet(nn.Module):
    def __init__(self, plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                 deep_supervision: bool, residual: bool = False):
        super().__init__()
        self.deep_supervision = deep_supervision and len(plan.strides) > 2
        self.net = _LevelKernelDynUNet(
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

    def train(self, mode: bool = True):
        # DynUNet's skip layers run their deep-supervision heads in every mode and keep the last outputs in
        # ``heads``: in eval mode a 1x1 convolution per level for nothing, and with a hundred classes the
        # kept outputs of the last batch of windows stay allocated (per fold of an ensemble). Unhooked here.
        super().train(mode)
        heads = self.net.heads if mode and self.deep_supervision else None
        if heads is None and self.deep_supervision:
            self.net.heads[:] = [torch.empty(0)] * len(self.net.heads)  # let the last training batch's go
        for module in self.net.modules():
            if isinstance(module, DynUNetSkipLayer):
                module.heads = heads
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net.output_block(self.net.skip_layers(x))
        if self.training and self.deep_supervision:
            # DynUNet fills ``heads`` through hooks during skip_layers; take them as they are.
            return [out] + list(self.net.heads)
        return out


def build_unet(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
               deep_supervision: bool) -> nn.Module:
    return PlannedUNet(plan, in_channels, num_classes, dimensions, deep_supervision)
