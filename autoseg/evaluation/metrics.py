"""Overlap and surface metrics of one binary mask pair, in physical units.

Definitions (the same as MONAI's ``compute_hausdorff_distance(percentile=95)`` and
``compute_surface_dice``, which ``scripts/bench_metrics.py`` checks):

* surface voxels: the mask minus its binary erosion (6-connected in 3D, 4 in 2D);
* HD95: the larger of the two directed 95th percentiles of surface-to-surface distances;
* NSD at tolerance tau: the fraction of surface voxels of both masks that lie within tau
  of the other mask's surface.

Empty masks: both empty -> Dice 1, IoU 1, NSD 1, HD95 0 (nothing to find, nothing found);
one empty -> Dice 0, IoU 0, NSD 0 and HD95 undefined (NaN, written as null and counted
separately in the summary, so means are never silently pulled towards a made-up value).

Speed: everything is computed inside the bounding box of both masks plus one voxel, so
the cost scales with the structure, not the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class PairMetrics:
    dice: float
    iou: float
    hd95: float  # mm; NaN when exactly one mask is empty
    nsd: float
    reference_voxels: int
    predicted_voxels: int


def _squeeze_2d(mask: np.ndarray, spacing: list[float]) -> tuple[np.ndarray, list[float]]:
    """2D images are stored with one slice and a placeholder spacing; drop that axis."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        return mask[0], list(spacing[1:])
    return mask, list(spacing)


def _crop_pair(reference: np.ndarray, prediction: np.ndarray):
    union = reference | prediction
    slices = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        slices.append(slice(present[0], present[-1] + 1))
    pad = [(1, 1)] * union.ndim
    return np.pad(reference[tuple(slices)], pad), np.pad(prediction[tuple(slices)], pad)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def surface_distances(reference: np.ndarray, prediction: np.ndarray, spacing: list[float]):
    """Distances (mm) from each surface voxel of one mask to the other's surface, both ways."""
    ref_surface, pred_surface = _surface(reference), _surface(prediction)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_ref[pred_surface], to_pred[ref_surface]


def dice_score(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks alone (cheap: no surfaces), with the empty-mask rules above."""
    total = int(reference.sum()) + int(prediction.sum())
    return 1.0 if total == 0 else 2.0 * int((reference & prediction).sum()) / total


def pair_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: list[float],
                 tolerance_mm: float = 1.0) -> PairMetrics:
    reference, spacing_used = _squeeze_2d(np.asarray(reference, bool), spacing)
    prediction, _ = _squeeze_2d(np.asarray(prediction, bool), spacing)
    n_ref, n_pred = int(reference.sum()), int(prediction.sum())
    if n_ref == 0 and n_pred == 0:
        return PairMetrics(1.0, 1.0, 0.0, 1.0, 0, 0)
    if n_ref == 0 or n_pred == 0:
        return PairMetrics(0.0, 0.0, math.nan, 0.0, n_ref, n_pred)
    intersection = int((reference & prediction).sum())
    dice = 2.0 * intersection / (n_ref + n_pred)
    iou = intersection / (n_ref + n_pred - intersection)
    ref_crop, pred_crop = _crop_pair(reference, prediction)
    pred_to_ref, ref_to_pred = surface_distances(ref_crop, pred_crop, spacing_used)
    hd95 = float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))
    within = int((pred_to_ref <= tolerance_mm).sum() + (ref_to_pred <= tolerance_mm).sum())
    nsd = within / (pred_to_ref.size + ref_to_pred.size)
    return PairMetrics(dice, iou, hd95, nsd, n_ref, n_pred)
