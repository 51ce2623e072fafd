"""A small synthetic 3D dataset that autoseg makes itself, for the demo and the tests.

Each case is a noisy MRI-like volume holding two ellipsoid "organs" (labels 1 and 2)
of random size and position, with anisotropic spacing (3 mm slices, 1 mm in-plane) and,
on every third case, a non-identity direction, so that the whole pipeline's handling of
geometry is exercised. Deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_XYZ = (1.0, 1.0, 3.0)
FLIPPED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
ROTATED_DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def make_case(rng: np.random.Generator, shape_zyx: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image (float32) and its label map (uint8) of ``shape_zyx``."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape_zyx], indexing="ij")
    # Physical coordinates in mm, so ellipsoids are round in space despite 3 mm slices.
    pz, py, px = z * SPACING_XYZ[2], y * SPACING_XYZ[1], x * SPACING_XYZ[0]
    extent = np.array(shape_zyx, dtype=float) * np.array(SPACING_XYZ[::-1])
    label = np.zeros(shape_zyx, dtype=np.uint8)
    image = rng.normal(100.0, 12.0, shape_zyx).astype(np.float32)
    for value, brightness in ((1, 180.0), (2, 260.0)):
        radius = rng.uniform(0.14, 0.22, 3) * extent.min() * np.array([1.0, 1.0, 1.3])
        centre = rng.uniform(0.3, 0.7, 3) * extent
        if value == 2:  # keep the second organ beside the first, not inside it
            centre[2] = extent[2] - centre[2]
        inside = (((pz - centre[0]) / radius[0]) ** 2 + ((py - centre[1]) / radius[1]) ** 2
                  + ((px - centre[2]) / radius[2]) ** 2) <= 1.0
        label[inside & (label == 0)] = value
        image[inside] += brightness - 100.0 + rng.normal(0.0, 15.0, int(inside.sum()))
    # A smooth bias field, as MRI has, so per-image normalisation matters.
    image *= (1.0 + 0.2 * np.sin(px / extent[2] * np.pi)).astype(np.float32)
    return image, label


def make_synthetic_dataset(folder: str | Path, num_cases: int = 12, seed: int = 0, num_test: int = 2) -> Path:
    """Write ``Dataset999_Synthetic`` in the nnU-Net v2 raw layout under ``folder``."""
    root = Path(folder) / "Dataset999_Synthetic"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_cases + num_test):
        shape = (int(rng.integers(14, 19)), int(rng.integers(44, 57)), int(rng.integers(44, 57)))
        image, label = make_case(rng, shape)
        direction = (FLIPPED_DIRECTION, ROTATED_DIRECTION)[index % 2] if index % 3 == 2 else None
        origin = tuple(float(v) for v in rng.uniform(-50, 50, 3))
        split = "Tr" if index < num_cases else "Ts"
        case_id = f"synth_{index:03d}"
        _write(image, root / f"images{split}" / f"{case_id}_0000.nii.gz", origin, direction)
        _write(label, root / f"labels{split}" / f"{case_id}.nii.gz", origin, direction)
    description = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "organ_a": 1, "organ_b": 2},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "name": "Synthetic",
        "description": "Noisy ellipsoids with 3 mm slices, made by autoseg.dataset.synthetic",
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return root


def _write(array: np.ndarray, path: Path, origin, direction) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)
