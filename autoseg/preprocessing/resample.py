"""Resampling images, label maps and class probabilities between voxel grids.

Images: cubic spline (order 3). Label maps: each class's mask is interpolated linearly
and every voxel takes the class with the highest value, so no label value appears that
was not there (interpolating label values directly would put 1s between 0s and 2s).
Along an anisotropic axis (``aniso_axis``) everything is resampled with nearest
neighbour after the in-plane pass: cubic interpolation across thick slices invents tissue.
Voxel centres are aligned (``grid_mode=True``), the convention of skimage's ``resize``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _zoom(array: np.ndarray, new_shape: list[int], order: int, aniso_axis: int | None) -> np.ndarray:
    """Resample one spatial array to ``new_shape``."""
    if list(array.shape) == list(new_shape):
        return array
    factors = [n / o for n, o in zip(new_shape, array.shape)]
    if aniso_axis is not None and order > 0 and array.shape[aniso_axis] != new_shape[aniso_axis]:
        in_plane = list(factors)
        in_plane[aniso_axis] = 1.0
        array = _zoom_exact(array, in_plane, order)
        along = [1.0] * array.ndim
        along[aniso_axis] = factors[aniso_axis]
        return _zoom_exact(array, along, 0)
    return _zoom_exact(array, factors, order)


def _zoom_exact(array: np.ndarray, factors: list[float], order: int) -> np.ndarray:
    if all(f == 1.0 for f in factors):
        return array
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)


def resample_image(image: np.ndarray, new_shape: list[int], order: int = 3, aniso_axis: int | None = None) -> np.ndarray:
    """``(C, *spatial)`` float image to ``(C, *new_shape)``, each channel kept within its own range.

    The cubic spline overshoots at sharp edges (air against bone: values below the scanner's minimum);
    like nnU-Net's skimage ``resize`` (``clip=True``), the result is clipped to the input's range."""
    if list(image.shape[1:]) == list(new_shape):
        return image.astype(np.float32, copy=False)
    channels = []
    for channel in image:
        channel = channel.astype(np.float32, copy=False)
        resampled = _zoom(channel, new_shape, order, aniso_axis)  # a new array: the shape differs
        channels.append(np.clip(resampled, channel.min(), channel.max(), out=resampled))  # no second volume
    return np.stack(channels)


def resample_labels(labels: np.ndarray, new_shape: list[int], order: int = 1, aniso_axis: int | None = None) -> np.ndarray:
    """Label map ``(*spatial)`` of integer values to ``new_shape`` without inventing values."""
    if list(labels.shape) == list(new_shape):
        return labels
    if order == 0:
        return _zoom(labels, new_shape, 0, None)
    values = np.unique(labels)
    best = np.full(new_shape, -np.inf, dtype=np.float32)
    result = np.zeros(new_shape, dtype=labels.dtype)
    for value in values:
        score = _zoom((labels == value).astype(np.float32), new_shape, order, aniso_axis)
        # Ties go to the higher value, as nnU-Net's ascending ">= 0.5" thresholds give them: doubling a
        # spacing (half the voxels) puts every output voxel midway between two inputs, and a one-voxel
        # structure would otherwise lose each tie to the background. The ignore label is -1 here, so it
        # loses its ties (in nnU-Net it is the highest value and wins them): no supervised voxel becomes
        # unsupervised.
        better = score >= best
        best[better] = score[better]
        result[better] = value
    return result


def resample_probabilities(probabilities: np.ndarray, new_shape: list[int], aniso_axis: int | None = None) -> np.ndarray:
    """Class probabilities ``(K, *spatial)`` to ``new_shape`` (linear; nearest along ``aniso_axis``)."""
    if list(probabilities.shape[1:]) == list(new_shape):
        return probabilities
    return np.stack([_zoom(p, new_shape, 1, aniso_axis) for p in probabilities])
