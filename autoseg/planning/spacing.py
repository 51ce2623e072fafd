"""Target spacing and resampling rules (nnU-Net's, written down).

* The full-resolution target spacing is the median spacing of the dataset.
* Anisotropic data: when the coarsest axis's median spacing is more than
  ``ANISOTROPY_THRESHOLD`` times the finest, and that axis has few voxels, the target
  along it is the 10th percentile of the dataset's spacings on that axis instead of the
  median: the median would make most cases lose slices, a lower value keeps them.
* Such an axis is resampled with nearest neighbour (order 0) and the others with
  order 3 ("separate z"), since cubic interpolation across 5-10 mm slices invents tissue.
  Decided per case, as nnU-Net does (``resampling_axis``): a thick-sliced case is resampled so
  even where the dataset's target spacing is near isotropic.
"""

from __future__ import annotations

import numpy as np

from autoseg.io.images import PLACEHOLDER_SPACING_2D as PLACEHOLDER_SPACING

ANISOTROPY_THRESHOLD = 3.0


def fullres_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Target spacing from per-case spacings and shapes (both ``(cases, 3)``, array order)."""
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(target.size) if a != coarse]
    coarse_shape = np.median(shapes[:, coarse])
    other_shape = min(np.median(shapes[:, a]) for a in others)
    if target[coarse] > ANISOTROPY_THRESHOLD * max(target[others]) and coarse_shape * ANISOTROPY_THRESHOLD < other_shape:
        low = np.percentile(spacings[:, coarse], 10)
        target[coarse] = max(low, max(target[others]) + 1e-5)
    return [float(s) for s in target]


def anisotropic_axis(spacing: list[float]) -> int | None:
    """The axis to resample with order 0, when one axis is much coarser than the others."""
    spacing = np.asarray(spacing, dtype=float)
    real = spacing[spacing != PLACEHOLDER_SPACING]
    if real.size < 2:
        return None
    coarse = int(np.argmax(spacing))
    others = np.delete(spacing, coarse)
    return coarse if spacing[coarse] > ANISOTROPY_THRESHOLD * others.max() else None


def resampling_axis(from_spacing: list[float], to_spacing: list[float]) -> int | None:
    """The axis resampled with order 0 between two spacings (array order): nnU-Net's rule. The case's
    own spacing decides where it is anisotropic (largest over smallest above ANISOTROPY_THRESHOLD), else
    the target's; a coarsest spacing shared by two axes (0.24 x 1.25 x 1.25 mm) means no such axis."""
    if PLACEHOLDER_SPACING in list(from_spacing) + list(to_spacing):
        return None  # a 2D image: nnU-Net's rule picks the placeholder axis, which is not resampled
    for spacing in (from_spacing, to_spacing):
        real = np.asarray(spacing, dtype=float)
        if real.max() / real.min() <= ANISOTROPY_THRESHOLD:
            continue
        coarsest = np.flatnonzero(real == real.max())
        return int(coarsest[0]) if coarsest.size == 1 else None
    return None


def resampled_shape(shape: list[int], spacing: list[float], target: list[float]) -> list[int]:
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]
