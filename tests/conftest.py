from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.dataset.synthetic import make_synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "dataset.json").exists():
        pytest.skip(f"{path} is missing (the real datasets live in ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A pristine synthetic dataset; copy it before changing anything."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw"), num_cases=6, num_test=2)


@pytest.fixture
def dataset_copy(synthetic_raw, tmp_path) -> Path:
    target = tmp_path / "raw" / synthetic_raw.name
    shutil.copytree(synthetic_raw, target)
    return target


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
