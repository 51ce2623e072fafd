"""Masked-volume inpainting: the self-supervised task every architecture can learn.

Random cubes of the patch are blanked out (set to 0, the normalised mean) and the network,
with an output channel per input channel instead of per class, reconstructs the image; the
loss is the mean squared error over the masked voxels only, so copying the visible input
earns nothing (SimMIM / Swin UNETR's inpainting task). The grid of cubes has 1/8 of the
patch per axis; ``MASK_RATIO`` of its cells are masked, a fresh draw per sample and step.
"""

from __future__ import annotations

import torch
from torch import nn

MASK_RATIO = 0.6
CUBES_PER_AXIS = 8


def random_cube_mask(shape: tuple[int, ...], ratio: float = MASK_RATIO, device=None) -> torch.Tensor:
    """``(B, 1, *spatial)`` of 0/1: 1 where masked. Cells of ``spatial // 8`` (at least 1) voxels per axis."""
    batch, spatial = shape[0], shape[2:]
    cells = [max(1, min(CUBES_PER_AXIS, s)) for s in spatial]
    grid = (torch.rand(batch, 1, *cells, device=device) < ratio).float()
    mask = nn.functional.interpolate(grid, size=tuple(spatial), mode="nearest")
    return mask


class MaskedInpainting(nn.Module):
    """Wraps a network: masks its input, returns ``(reconstruction, mask)``."""

    def __init__(self, network: nn.Module, ratio: float = MASK_RATIO):
        super().__init__()
        self.network, self.ratio = network, ratio

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = random_cube_mask(tuple(image.shape), self.ratio, image.device)
        output = self.network(image * (1 - mask))
        output = output[0] if isinstance(output, (list, tuple)) else output  # full resolution only
        return output, mask


class MaskedReconstructionLoss(nn.Module):
    """Mean squared error over the masked voxels (all channels)."""

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        reconstruction, mask = outputs
        squared = (reconstruction.float() - target.float()) ** 2 * mask
        return squared.sum() / (mask.sum() * target.shape[1]).clamp_min(1.0)
