"""Cropping to the non-zero region, as nnU-Net does.

Many scans (skull-stripped MRI, MSD crops) carry a large zero border; cropping it away
before resampling saves time and memory and is undone exactly on export.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel is non-zero, holes filled (a zero inside the body stays in)."""
    mask = np.any(image != 0, axis=0)
    if mask.all() or not mask.any():
        return mask
    if mask.shape[0] == 1:  # a 2D image: filled in its plane (in 3D, the one slice would be all border)
        return ndimage.binary_fill_holes(mask[0])[None]
    return ndimage.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...] per axis of the True voxels; the whole array when there are none."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append([int(present[0]), int(present[-1]) + 1])
    return box


def crop(array: np.ndarray, box: list[list[int]]) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``box``."""
    slices = tuple(slice(lo, hi) for lo, hi in box)
    return array[(Ellipsis, *slices)]


def uncrop(array: np.ndarray, box: list[list[int]], full_shape: list[int], fill=0) -> np.ndarray:
    """Place ``array`` (spatial axes last) back into an array of ``full_shape`` spatially."""
    lead = array.shape[: array.ndim - len(full_shape)]
    out = np.full((*lead, *full_shape), fill, dtype=array.dtype)
    out[(Ellipsis, *(slice(lo, hi) for lo, hi in box))] = array
    return out
