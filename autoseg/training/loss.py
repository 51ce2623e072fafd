"""Dice + cross-entropy with deep supervision, as nnU-Net trains.

Dice is the batch Dice over foreground classes (one Dice per class over the whole batch,
which is stabler than per-sample Dice for small structures); voxels marked -1 (ignore)
count in neither term. Deep-supervision outputs are weighted 1, 1/2, 1/4 ..., the
coarsest off, normalised to sum 1; the target is downsampled to each output by nearest
neighbour rather than the outputs upsampled, which is cheaper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1


def deep_supervision_weights(num_outputs: int) -> list[float]:
    if num_outputs == 1:
        return [1.0]
    weights = [0.5**i for i in range(num_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DiceCELoss(nn.Module):
    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K, *spatial), ``target`` (B, *spatial) long with -1 for ignored voxels."""
        valid = target != IGNORE
        safe = target.clamp_min(0)
        ce = F.cross_entropy(logits.float(), safe, reduction="none")
        count = valid.sum().clamp_min(1)
        ce = (ce * valid).sum() / count
        probabilities = torch.softmax(logits.float(), 1) * valid.unsqueeze(1)
        # Scattered into one float tensor: F.one_hot makes an int64 (B, *spatial, K) first, 8 bytes per class
        # and voxel, which with a hundred classes outgrows the network's own activations.
        one_hot = torch.zeros_like(probabilities).scatter_(1, safe.unsqueeze(1), 1.0).mul_(valid.unsqueeze(1))
        axes = [0] + list(range(2, logits.ndim))
        intersection = (probabilities * one_hot).sum(axes)
        denominator = probabilities.sum(axes) + one_hot.sum(axes)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return ce + (1.0 - dice[1:].mean())


def region_masks(target: torch.Tensor, regions: list[list[int]]) -> torch.Tensor:
    """(B, R, *spatial) float: voxel in region r when its label value is one of ``regions[r]``."""
    values = torch.as_tensor([v for region in regions for v in region], device=target.device)
    owner = torch.as_tensor([r for r, region in enumerate(regions) for _ in region], device=target.device)
    masks = torch.zeros((target.shape[0], len(regions), *target.shape[1:]), device=target.device)
    for value, r in zip(values.tolist(), owner.tolist()):
        masks[:, r] += (target == value).float()
    return masks.clamp_(max=1.0)


class RegionDiceBCELoss(nn.Module):
    """nnU-Net's loss for region-based labels (say, BraTS's nested tumour regions): one sigmoid
    output per region, binary cross-entropy plus batch Dice of each region; regions overlap,
    so a softmax over them would be wrong. Voxels marked -1 (ignore) count in neither term."""

    def __init__(self, regions: list[list[int]], smooth: float = 1e-5):
        super().__init__()
        self.regions = regions
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, R, *spatial), ``target`` (B, *spatial) label values with -1 for ignored voxels."""
        valid = (target != IGNORE).unsqueeze(1).float()
        masks = region_masks(target, self.regions)
        bce = F.binary_cross_entropy_with_logits(logits.float(), masks, reduction="none")
        bce = (bce * valid).sum() / (valid.sum() * logits.shape[1]).clamp_min(1)
        probabilities = torch.sigmoid(logits.float()) * valid
        masks = masks * valid
        axes = [0] + list(range(2, logits.ndim))
        intersection = (probabilities * masks).sum(axes)
        denominator = probabilities.sum(axes) + masks.sum(axes)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return bce + (1.0 - dice.mean())


class DeepSupervisionLoss(nn.Module):
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, output in zip(deep_supervision_weights(len(outputs)), outputs):
            # A zero weight is still applied (not skipped): the head then stays in the graph,
            # which DistributedDataParallel requires of every parameter.
            scaled = target
            if output.shape[2:] != target.shape[1:]:
                scaled = F.interpolate(target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
            total = total + weight * self.loss(output, scaled)
        return total
