"""Where to look at a case: the slices through its largest disagreement, shown the way viewers show them.

Slices are chosen in the file's own array order ``(Z, Y, X)``, where the metrics were
computed. For each axis the chosen slice is the one holding the most voxels of the
largest connected disagreement (voxels where reference and prediction differ for some
class, ignore label excluded), so every panel cuts through the error a user most needs
to see. With no disagreement, the slices pass through the centre of the reference's
objects (of the image when there are none).

For display, arrays are turned into the patient's frame with the image's direction
(signed axis permutation, nearest axis for oblique images) and shown as radiology
viewers do in LPS: axial with anterior up and the patient's right on the left, coronal
and sagittal with superior up. A flipped or rotated file therefore looks the same as
an identity-direction file of the same anatomy; the metrics never see this transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from autoseg.io.images import Geometry


@dataclass
class SliceChoice:
    index: list[int]  # one slice per array axis (Z, Y, X) of the file
    reason: str  # "largest disagreement", "object centre" or "image centre"
    disagreement_voxels: int  # all disagreeing voxels of the case


@dataclass
class Panel:
    name: str  # axial, coronal, sagittal, or "2D"
    array_axis: int  # the file's array axis this panel is perpendicular to
    slice_index: int  # along that axis, in the file
    aspect: float  # physical height / width of one pixel
    rows: tuple[slice, ...]  # how to cut the display volume to get this panel

    @property
    def label(self) -> str:
        return self.name if self.name == "2D" else f"{self.name} ({'ZYX'[self.array_axis]} = {self.slice_index})"


def disagreement_mask(reference: np.ndarray, prediction: np.ndarray, classes: dict[str, list[int]],
                      ignore: int | None) -> np.ndarray:
    """Voxels where reference and prediction disagree about any evaluated class (or region)."""
    mask = np.zeros(reference.shape, bool)
    for values in classes.values():
        mask |= np.isin(reference, values) != np.isin(prediction, values)
    if ignore is not None:
        mask &= reference != ignore
    return mask


def choose_slices(reference: np.ndarray, prediction: np.ndarray, classes: dict[str, list[int]],
                  ignore: int | None) -> SliceChoice:
    disagreement = disagreement_mask(reference, prediction, classes, ignore)
    total = int(disagreement.sum())
    if total:
        components, count = ndimage.label(disagreement)
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        target, reason = components == largest, "largest disagreement"
        index = [int(np.argmax(target.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
        return SliceChoice(index, reason, total)
    foreground = np.isin(reference, [v for values in classes.values() for v in values])
    if foreground.any():
        centre = ndimage.center_of_mass(foreground)
        return SliceChoice([int(round(c)) for c in centre], "object centre", 0)
    return SliceChoice([n // 2 for n in reference.shape], "image centre", 0)


def display_transform(geometry: Geometry) -> tuple[list[int], list[bool]]:
    """Axis permutation and flips that turn a file's ``(Z, Y, X)`` array into LPS display order.

    ``volume.transpose(perm)`` then flipping the axes marked in ``flips`` puts array axis
    0 along the patient's inferior-superior axis, 1 anterior-posterior, 2 right-left,
    each increasing towards S, P and L. 2D images keep their placeholder first axis.
    """
    n = geometry.dimension
    direction = np.array(geometry.direction).reshape(n, n)  # column i: where index axis i points
    physical = np.argmax(np.abs(direction), axis=0)
    if sorted(physical.tolist()) != list(range(n)):  # 45-degree obliques: no clear axis, keep the file's order
        return [0, 1, 2], [False, False, False]
    perm, flips = [0, 1, 2], [False, False, False]
    for display_axis in range(3 - n, 3):
        p = 2 - display_axis  # ITK physical axis (x, y, z) shown along this display axis
        i = int(np.flatnonzero(physical == p)[0])  # ITK index axis that points along it
        perm[display_axis] = 2 - i
        flips[display_axis] = bool(direction[p, i] < 0)
    return perm, flips


def to_display(volume: np.ndarray, perm: list[int], flips: list[bool]) -> np.ndarray:
    """A ``(Z, Y, X)`` array (or ``(Z, Y, X, colour)``) in display order (a view, no copy)."""
    volume = volume.transpose(list(perm) + list(range(3, volume.ndim)))
    return volume[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def display_panels(geometry: Geometry, choice: SliceChoice) -> list[Panel]:
    """The panels to draw: one for 2D images, axial, coronal and sagittal for 3D."""
    perm, flips = display_transform(geometry)
    spacing = np.array(geometry.array_spacing)[perm]
    shape = np.array(geometry.array_shape)[perm]
    if geometry.dimension == 2:
        return [Panel("2D", 0, 0, float(spacing[1] / spacing[2]), (0, slice(None), slice(None)))]
    panels = []
    # (display axis fixed by the panel, its name, whether rows run upwards: superior on top)
    for axis, name in ((0, "axial"), (1, "coronal"), (2, "sagittal")):
        source = perm[axis]
        k = choice.index[source]
        k_display = shape[axis] - 1 - k if flips[axis] else k
        rows: list = [slice(None)] * 3
        rows[axis] = int(k_display)
        remaining = [a for a in range(3) if a != axis]
        if axis != 0:  # the vertical axis is Z: draw superior on top
            rows[0] = slice(None, None, -1)
        aspect = float(spacing[remaining[0]] / spacing[remaining[1]])
        panels.append(Panel(name, source, int(k), aspect, tuple(rows)))
    return panels
