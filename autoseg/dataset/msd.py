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
from autoseg.errors import DatasetError
from autoseg.records import read_json

_TASK = re.compile(r"^Task(\d+)_(\w+)$")


def convert_msd(task_dir: str | Path, raw_root: str | Path, dataset_id: int | None = None) -> Path:
    task_dir = Path(task_dir).resolve()
    match = _TASK.match(task_dir.name)
    if not match:
        raise DatasetError("folder name must look like Task04_Hippocampus", task_dir)
    number = dataset_id if dataset_id is not None else int(match.group(1))
    target = Path(raw_root) / f"Dataset{number:03d}_{match.group(2)}"
    json_path = task_dir / "dataset.json"
    meta = read_json(json_path, DatasetError)
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise DatasetError(f"missing key '{key}' (not an MSD dataset.json?)", json_path)
    tmp = target.with_name(f".{target.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp / sub).mkdir(parents=True)
    num_channels = len(meta["modality"])
    for entry in meta["training"]:
        image = inside(task_dir, entry["image"], json_path, "'training'")
        label = inside(task_dir, entry["label"], json_path, "'training'")
        case_id = image.name[: -len(".nii.gz")]
        _split_channels(image, tmp / "imagesTr", case_id, num_channels)
        shutil.copyfile(label, tmp / "labelsTr" / f"{case_id}.nii.gz")
    for entry in meta.get("test", []):
        image = inside(task_dir, entry if isinstance(entry, str) else entry["image"], json_path, "'test'")
        _split_channels(image, tmp / "imagesTs", image.name[: -len(".nii.gz")], num_channels)
    labels = {name if int(value) else "background": int(value) for value, name in meta["labels"].items()}
    description = {
        "channel_names": {str(k): v for k, v in meta["modality"].items()},
        "labels": labels,
        "numTraining": len(meta["training"]),
        "file_ending": ".nii.gz",
        "name": meta.get("name", match.group(2)),
        "description": meta.get("description", ""),
        "reference": meta.get("reference", ""),
        "licence": meta.get("licence", ""),
    }
    (tmp / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


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
