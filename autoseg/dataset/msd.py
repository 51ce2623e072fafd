"""Converting a Medical Segmentation Decathlon task folder to the nnU-Net v2 layout.

MSD stores multi-channel images as one 4D NIfTI; nnU-Net v2 (and autoseg) want one file
per channel (``_0000``, ``_0001`` ...). Headers are kept (nibabel copies the affine), so
each channel lies exactly where the 4D image did.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from autoseg.dataset.spec import inside
from autoseg.errors import DatasetError, UsageError
from autoseg.records import read_json

_TASK = re.compile(r"^Task(\d+)_(\w+)$")


def convert_msd(task_dir: str | Path, raw_root: str | Path, dataset_id: int | None = None) -> Path:
    task_dir = Path(task_dir).resolve()
    match = _TASK.match(task_dir.name)
    if not match:
        raise DatasetError("folder name must look like Task04_Hippocampus", task_dir)
    number = dataset_id if dataset_id is not None else int(match.group(1))
    if not 0 <= number <= 999:
        raise UsageError(f"dataset id {number}: ids are 0 to 999 (DatasetNNN_Name)")
    target = Path(raw_root) / f"Dataset{number:03d}_{match.group(2)}"
    json_path = task_dir / "dataset.json"
    meta = read_json(json_path, DatasetError)
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise DatasetError(f"missing key '{key}' (not an MSD dataset.json?)", json_path)
    tmp = target.with_name(f".{target.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert_into(tmp, task_dir, meta, json_path, match.group(2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-converted is left behind
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _convert_into(tmp: Path, task_dir: Path, meta: dict, json_path: Path, task_name: str) -> None:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp / sub).mkdir(parents=True)
    num_channels = len(meta["modality"])
    for entry in meta["training"]:
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise DatasetError(f"each 'training' entry needs \"image\" and \"label\", got {entry!r}", json_path)
        image = inside(task_dir, entry["image"], json_path, "'training'")
        label = inside(task_dir, entry["label"], json_path, "'training'")
        case_id = image.name[: -len(".nii.gz")]
        _split_channels(image, tmp / "imagesTr", case_id, num_channels)
        shutil.copyfile(label, tmp / "labelsTr" / f"{case_id}.nii.gz")
    for entry in meta.get("test", []):
        if not isinstance(entry, str) and not (isinstance(entry, dict) and "image" in entry):
            raise DatasetError(f"each 'test' entry needs an image path, got {entry!r}", json_path)
        image = inside(task_dir, entry if isinstance(entry, str) else entry["image"], json_path, "'test'")
        _split_channels(image, tmp / "imagesTs", image.name[: -len(".nii.gz")], num_channels)
    labels = {name if int(value) else "background": int(value) for value, name in meta["labels"].items()}
    description = {
        "channel_names": {str(k): v for k, v in meta["modality"].items()},
        "labels": labels,
        "numTraining": len(meta["training"]),
        "file_ending": ".nii.gz",
        "name": meta.get("name", task_name),
        "description": meta.get("description", ""),
        "reference": meta.get("reference", ""),
        "licence": meta.get("licence", ""),
    }
    (tmp / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")


def _split_channels(image_path: Path, out_dir: Path, case_id: str, num_channels: int) -> None:
    image = nib.load(str(image_path))
    if image.ndim == 3:
        if num_channels != 1:
            raise DatasetError(f"3D image but dataset.json lists {num_channels} modalities", image_path)
        shutil.copyfile(image_path, out_dir / f"{case_id}_0000.nii.gz")
        return
    if image.ndim != 4 or image.shape[3] != num_channels:
        raise DatasetError(f"shape {image.shape} does not hold {num_channels} channel(s) on the 4th axis", image_path)
    data = np.asarray(image.dataobj)
    for channel in range(num_channels):
        header = image.header.copy()
        header.set_data_shape(image.shape[:3])
        part = nib.Nifti1Image(np.ascontiguousarray(data[..., channel]), image.affine, header)
        nib.save(part, str(out_dir / f"{case_id}_{channel:04d}.nii.gz"))
