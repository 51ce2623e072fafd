"""Writing DICOM series with SimpleITK for the tests: one file per slice, as scanners export them.

Positions and orientation are computed from the image's geometry by SimpleITK
(``TransformIndexToPhysicalPoint``), not by autoseg, so that reading them back is an
independent check of autoseg's geometry.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _ds(value: float) -> str:
    return f"{value:.10g}"


def write_series(image: sitk.Image, folder: Path, series_uid: str, study_uid: str = "1.2.826.0.1.3680043.8.498.1",
                 patient_id: str = "P1", series_number: int = 1, description: str = "test series",
                 modality: str = "CT", prefix: str = "", shuffle_seed: int | None = None,
                 tilt_mm_per_slice: float = 0.0) -> list[Path]:
    """Write ``image`` (integer pixels) as one file per slice into ``folder``; returns the files.

    ``shuffle_seed`` scrambles the file names against the slice order; ``tilt_mm_per_slice``
    shifts each slice's position sideways (along the row direction), as a gantry tilt does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    orientation = "\\".join(_ds(v) for v in (direction[0], direction[3], direction[6],
                                              direction[1], direction[4], direction[7]))
    row = np.array([direction[0], direction[3], direction[6]])
    names = list(range(image.GetDepth()))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for index in range(image.GetDepth()):
        slice_image = image[:, :, index]
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, index))) + tilt_mm_per_slice * index * row
        tags = {
            "0008|0016": CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE,
            "0008|0018": f"{series_uid}.{index + 1}",
            "0008|0020": "20240102", "0008|0060": modality, "0008|103e": description,
            "0010|0010": "Test^Patient", "0010|0020": patient_id,
            "0020|000d": study_uid, "0020|000e": series_uid, "0020|0011": str(series_number),
            "0020|0013": str(index + 1), "0020|0052": f"{study_uid}.9",
            "0020|0037": orientation, "0020|0032": "\\".join(_ds(v) for v in position),
            "0028|0030": f"{_ds(image.GetSpacing()[1])}\\{_ds(image.GetSpacing()[0])}",
            "0018|0050": "99",  # a wrong SliceThickness: the spacing must come from the positions
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        path = folder / f"{prefix}slice{names[index]:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_image)
        files.append(path)
    return files


def image_from_array(array_zyx: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array_zyx))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction])
    return image


def oblique_direction() -> list[float]:
    """A right-handed rotation about an oblique axis (no axis stays aligned with the patient's)."""
    angle = np.deg2rad(20.0)
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return [float(v) for v in rotation.ravel()]
