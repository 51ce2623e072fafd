"""Sliding-window prediction of class probabilities over a whole preprocessed image.

Windows are placed as nnU-Net places them (evenly spread, the first at the start and the
last at the end, ``step`` x patch apart at most) and weighted by MONAI's Gaussian
importance map (sigma = 1/8 of the patch: window centres are trusted more than their
borders). Mirroring test-time augmentation and the ensemble of folds are evaluated
inside the window function, so one pass over the windows serves every flip and every
fold, and only one probability volume is ever accumulated.

Why not MONAI's ``sliding_window_inference``, which the first version used: it
accumulates in the input's dtype (float32) and hands back a second full-size copy, so a
512x512x400 CT with 14 classes needed about 12 GB for the buffers alone. Here the
accumulator is float16 once it would pass ``COMPACT_ABOVE_BYTES`` (nnU-Net accumulates
in float16 too; the relative error, about 1e-3, is far below what changes an argmax
except on exact ties), the normalisation is done in place, and windows go through the
network in batches (``scripts/bench_large_ct.py`` measures it).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from monai.data.utils import compute_importance_map
from torch import nn

# A float32 accumulator larger than this (K classes x voxels x 4 bytes) is kept in float16.
COMPACT_ABOVE_BYTES = 1 << 30


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (tensor dims), the empty one (no flip) first."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Start indices of windows of ``patch`` along an axis of ``size`` (>= patch), evenly spread."""
    if size <= patch:
        return [0]
    # At least a voxel apart: a 2D network's windows through a volume are one slice thick, and half a
    # slice apart would visit most slices twice (nnU-Net's 2D prediction takes each slice once).
    count = math.ceil((size - patch) / max(patch * step, 1.0)) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


class EnsembleWindowFunction:
    """softmax(network(window)) averaged over networks and mirror flips (``sigmoid``: one
    independent probability per region output, for region-based labels).

    The flips of a batch of windows go through the network together, up to
    ``images_per_call`` images per call (a batch of small patches computes faster than
    the same patches one by one; on the CPU, large batches are slower: see networks/call_size.py)."""

    def __init__(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int], amp_dtype: torch.dtype | None,
                 images_per_call: int = 1, sigmoid: bool = False):
        self.networks = list(networks)
        self.activation = torch.sigmoid if sigmoid else (lambda logits: torch.softmax(logits, dim=1))
        self.flips = mirror_combinations(mirror_axes)
        self.amp_dtype = amp_dtype
        self.images_per_call = max(1, images_per_call)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        total, count = None, windows.shape[0]
        flips_per_call = max(1, self.images_per_call // count)
        for network in self.networks:
            for first in range(0, len(self.flips), flips_per_call):
                group = self.flips[first:first + flips_per_call]
                x = torch.cat([torch.flip(windows, flip) if flip else windows for flip in group])
                with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = network(x)
                probabilities = self.activation(logits.float())
                for index, flip in enumerate(group):
                    part = probabilities[index * count:(index + 1) * count]
                    part = torch.flip(part, flip) if flip else part
                    total = part if total is None else total.add_(part)
        return total.div_(len(self.networks) * len(self.flips))


@torch.inference_mode()
def predict_probabilities(networks: Sequence[nn.Module], image: torch.Tensor, patch_size: Sequence[int],
                          step: float = 0.5, mirror: bool = True, images_per_call: int = 4,
                          amp_dtype: torch.dtype | None = None, progress: bool = False,
                          sigmoid: bool = False, compute_device: torch.device | None = None) -> torch.Tensor:
    """Class probabilities ``(K, *spatial)`` of ``image`` ``(C, *spatial)``; 2D or 3D after the channel axis.

    For a 2D network on a 3D volume, pass ``image`` as ``(C, Z, Y, X)`` with a 2D
    ``patch_size``: each window is one slice, and slices go through the network in batches.
    ``images_per_call``: windows x mirror flips per network call.
    ``sigmoid``: region-based outputs, each an independent probability instead of a softmax.
    ``compute_device``: where the networks run when it is not ``image``'s device: windows go there and
    their probabilities come back, so the image and the sums stay in (host) memory.
    The result is float32, or float16 when a float32 volume would pass ``COMPACT_ABOVE_BYTES``.
    """
    dims, spatial = len(patch_size), list(image.shape[1:])
    if len(spatial) == dims:
        patch, slice_axis = list(patch_size), None
    elif len(spatial) == 3 and dims == 2:
        patch, slice_axis = [1, *patch_size], 2  # (B, C, 1, Y, X) windows, squeezed for the network
    else:
        raise ValueError(f"image of shape {tuple(image.shape)} does not fit a {dims}D patch {list(patch_size)}")
    # Images smaller than the patch are padded with zeros (the normalised background) around the centre.
    before = [max(p - s, 0) // 2 for p, s in zip(patch, spatial)]
    after = [max(p - s, 0) - b for p, s, b in zip(patch, spatial, before)]
    if any(before) or any(after):
        pad = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]
        image = torch.nn.functional.pad(image, pad)
    padded = list(image.shape[1:])
    starts = itertools.product(*[window_starts(s, p, step) for s, p in zip(padded, patch)])
    boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in starts]

    window_function = EnsembleWindowFunction(networks, list(range(2, 2 + dims)) if mirror else [], amp_dtype,
                                             images_per_call, sigmoid)
    windows_per_batch = max(1, images_per_call // len(window_function.flips))
    weights = compute_importance_map(list(patch_size), mode="gaussian", sigma_scale=0.125, device=image.device,
                                     dtype=torch.float32).reshape(patch)
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=image.device)
    total = None
    batches = range(0, len(boxes), max(1, windows_per_batch))
    for first in (batches if not progress else _bar(batches)):
        batch = boxes[first:first + windows_per_batch]
        windows = torch.stack([image[(slice(None), *box)] for box in batch])
        if compute_device is not None:
            windows = windows.to(compute_device)
        probabilities = window_function(windows.squeeze(slice_axis) if slice_axis else windows)
        probabilities = probabilities.to(image.device)
        if slice_axis:
            probabilities = probabilities.unsqueeze(slice_axis)
        probabilities.mul_(weights)
        if total is None:
            classes = probabilities.shape[1]
            compact = classes * math.prod(padded) * 4 > COMPACT_ABOVE_BYTES
            total = torch.zeros([classes, *padded], device=image.device,
                                dtype=torch.float16 if compact else torch.float32)
        for box, window in zip(batch, probabilities):
            total[(slice(None), *box)] += window.to(total.dtype)
            weight_sum[box] += weights
    for channel in total:  # in place, one class at a time: no second full-size volume
        channel.div_(weight_sum)
    return total[(slice(None), *(slice(b, b + s) for b, s in zip(before, spatial)))]


def _bar(iterable):
    from tqdm import tqdm

    return tqdm(iterable, desc="windows", unit="batch", leave=False)
