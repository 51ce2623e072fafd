"""Residual-encoder U-Net (nnU-Net's ResEnc presets), also the backbone of U-Mamba and xLSTM-UNet.

nnU-Net's ResEnc U-Net (Isensee et al. 2024) differs from the plain U-Net in the encoder
only: a stem convolution, then per stage several pre-activation-free residual blocks
("BasicBlockD": conv-norm-act, conv-norm, add, act, the skip average-pooled then 1x1
projected when the stage downsamples), with more blocks deeper down (ResEnc-M/L:
1, 3, 4, 6, 6, 6, ...), which is where extra capacity pays off. The decoder stays light:
transposed-conv upsampling, concatenation with the skip, one conv-norm-act.

MONAI's ``DynUNet(res_block=True)`` is not used: it puts a residual unit in every encoder
*and* decoder level, one block per stage, so it cannot express the 1,3,4,6,... encoder.

``ResidualEncoderUNet`` takes ``stage_mixers``: an optional module per encoder stage applied
to that stage's output (before it becomes a skip and the next stage's input). U-Mamba and
xLSTM-UNet plug their sequence layers in there instead of re-implementing the U-Net.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from autoseg.planning.plans import ArchitecturePlan

# nnU-Net ResEnc-M/L blocks per encoder stage; longer topologies repeat the last entry.
RESENC_BLOCKS_PER_STAGE = [1, 3, 4, 6, 6, 6, 6]


def conv_nd(dimensions: int) -> type[nn.Module]:
    return nn.Conv3d if dimensions == 3 else nn.Conv2d


def norm_nd(dimensions: int, channels: int) -> nn.Module:
    norm = nn.InstanceNorm3d if dimensions == 3 else nn.InstanceNorm2d
    return norm(channels, affine=True, eps=1e-5)


def activation() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


def _padding(kernel: Sequence[int]) -> list[int]:
    return [k // 2 for k in kernel]


class ConvNormAct(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] | int = 1):
        super().__init__(conv_nd(dims)(cin, cout, list(kernel), stride, _padding(kernel), bias=True),
                         norm_nd(dims, cout), activation())


class ResidualBlock(nn.Module):
    """nnU-Net's BasicBlockD: the skip downsamples by average pooling (not a strided 1x1
    conv, which would drop 7 of 8 voxels) and projects channels only when they change."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        conv = conv_nd(dims)
        self.conv1 = ConvNormAct(dims, cin, cout, kernel, list(stride))
        self.conv2 = nn.Sequential(conv(cout, cout, list(kernel), 1, _padding(kernel), bias=True),
                                   norm_nd(dims, cout))
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
            skip.append(pool(list(stride), list(stride)))
        if cin != cout:
            skip += [conv(cin, cout, 1, bias=False), norm_nd(dims, cout)]
        self.skip = nn.Sequential(*skip)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ResidualEncoderUNet(nn.Module):
    def __init__(self, plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                 deep_supervision: bool, blocks_per_stage: Sequence[int],
                 stage_mixers: Sequence[nn.Module | None] | None = None, residual_decoder: bool = False):
        super().__init__()
        n = len(plan.strides)
        feats, kernels, strides = plan.features, plan.kernel_sizes, plan.strides
        blocks = [blocks_per_stage[min(i, len(blocks_per_stage) - 1)] for i in range(n)]
        # Same rule as the DynUNet wrapper: with two stages there is no coarser head worth supervising.
        self.deep_supervision = deep_supervision and n > 2
        self.stem = ConvNormAct(dimensions, in_channels, feats[0], kernels[0])
        self.encoder = nn.ModuleList()
        for s in range(n):
            cin = feats[0] if s == 0 else feats[s - 1]
            stage = [ResidualBlock(dimensions, cin, feats[s], kernels[s], strides[s])]
            stage += [ResidualBlock(dimensions, feats[s], feats[s], kernels[s], [1] * dimensions)
                      for _ in range(blocks[s] - 1)]
            self.encoder.append(nn.Sequential(*stage))
        mixers = list(stage_mixers) if stage_mixers is not None else [None] * n
        self.mixers = nn.ModuleList([m if m is not None else nn.Identity() for m in mixers])

        transposed = nn.ConvTranspose3d if dimensions == 3 else nn.ConvTranspose2d
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n - 2, -1, -1):  # decoder levels from coarse to fine
            self.upsample.append(transposed(feats[s + 1], feats[s], strides[s + 1], strides[s + 1], bias=True))
            if residual_decoder:
                self.decoder.append(ResidualBlock(dimensions, 2 * feats[s], feats[s], kernels[s], [1] * dimensions))
            else:
                self.decoder.append(ConvNormAct(dimensions, 2 * feats[s], feats[s], kernels[s]))
            self.heads.append(conv_nd(dimensions)(feats[s], num_classes, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage, mixer in zip(self.encoder, self.mixers):
            x = mixer(stage(x))
            skips.append(x)
        x = skips.pop()
        want_all = self.training and self.deep_supervision
        outputs = []
        for level, (up, block, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
            # Heads of coarse levels are only computed when they will be supervised.
            if want_all or level == len(self.heads) - 1:
                outputs.append(head(x))
        if want_all:
            return outputs[::-1]  # full resolution first
        return outputs[-1]


def build_resenc_unet(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                      deep_supervision: bool) -> nn.Module:
    blocks = plan.options.get("blocks_per_stage", RESENC_BLOCKS_PER_STAGE)
    return ResidualEncoderUNet(plan, in_channels, num_classes, dimensions, deep_supervision, blocks)
