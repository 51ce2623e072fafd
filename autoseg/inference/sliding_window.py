"""Sliding-window prediction of class probabilities over a whole preprocessed image.

MONAI's ``sliding_window_inference`` does the tiling and the Gaussian weighting (sigma =
1/8 of the patch, nnU-Net's choice: window centres are trusted more than their borders).
What autoseg adds is the window function: mirroring test-time augmentation and the
ensemble of folds are evaluated inside it, so one pass over the windows serves every
flip and every fold, and only one probability volume is ever accumulated.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (tensor dims), the empty one (no flip) first."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class EnsembleWindowFunction:
    """softmax(network(window)) averaged over networks and mirror flips (sigmoid for region outputs)."""

    def __init__(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int], amp_dtype: torch.dtype | None,
                 sigmoid: bool = False):
        self.networks = list(networks)
        self.flips = mirror_combinations(mirror_axes)
        self.amp_dtype = amp_dtype
        self.activation = torch.sigmoid if sigmoid else (lambda logits: torch.softmax(logits, dim=1))

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        total = None
        for network in self.networks:
            for flip in self.flips:
                x = torch.flip(window, flip) if flip else window
                with torch.autocast(window.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = network(x)
                probabilities = self.activation(logits.float())
                if flip:
                    probabilities = torch.flip(probabilities, flip)
                total = probabilities if total is None else total + probabilities
        return total / (len(self.networks) * len(self.flips))


@torch.inference_mode()
def predict_probabilities(networks: Sequence[nn.Module], image: torch.Tensor, patch_size: Sequence[int],
                          step: float = 0.5, mirror: bool = True, windows_per_batch: int = 4,
                          amp_dtype: torch.dtype | None = None, progress: bool = False,
                          sigmoid: bool = False) -> torch.Tensor:
    """Class probabilities ``(K, *spatial)`` of ``image`` ``(C, *spatial)``; 2D or 3D after the channel axis.
    ``sigmoid``: region-based outputs, each an independent probability instead of a softmax.

    For a 2D network on a 3D volume, pass ``image`` as ``(C, Z, Y, X)`` with a 2D
    ``patch_size``: slices along Z are predicted as a batch of 2D images.
    """
    dims = len(patch_size)
    if image.ndim - 1 == dims:
        batch = image[None]  # (1, C, *spatial)
    elif image.ndim - 1 == 3 and dims == 2:
        batch = image.permute(1, 0, 2, 3)  # (Z, C, Y, X): slices as a batch
    else:
        raise ValueError(f"image of shape {tuple(image.shape)} does not fit a {dims}D patch {list(patch_size)}")
    mirror_axes = list(range(2, 2 + dims)) if mirror else []
    window_function = EnsembleWindowFunction(networks, mirror_axes, amp_dtype, sigmoid)
    outputs = []
    # Slices are predicted a few at a time so that the probability buffer stays small.
    chunk = batch.shape[0] if dims == 3 else max(1, windows_per_batch)
    for start in range(0, batch.shape[0], chunk):
        part = sliding_window_inference(batch[start:start + chunk], roi_size=list(patch_size),
                                        sw_batch_size=windows_per_batch, predictor=window_function,
                                        overlap=1.0 - step, mode="gaussian", sigma_scale=0.125,
                                        padding_mode="constant", cval=0.0, progress=progress)
        outputs.append(part.to(torch.float16 if part.device.type == "cpu" else part.dtype))
    probabilities = torch.cat(outputs, 0)
    if dims == 3:
        return probabilities[0].float()
    return probabilities.permute(1, 0, 2, 3).float()  # (K, Z, Y, X)
