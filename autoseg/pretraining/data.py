"""Images without labels for pre-training: preprocessed by the dataset's plan, drawn as random patches.

The pool is the dataset's ``imagesTr`` and ``imagesTs`` and any extra folders of scans (same
channels, ``CASE_0000.nii.gz`` ... or a plain ``CASE.nii.gz`` for one channel). Each image is
cropped, normalised and resampled exactly as ``plan-and-preprocess`` does for training
(``preprocess_arrays`` with no label) and stored once as ``CASE.npy`` in
``AUTOSEG_PREPROCESSED/DatasetNNN_Name/pretrain_<data_identifier>/`` (a later run reuses it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from autoseg.errors import UsageError
from autoseg.inference.folder import list_input_cases, read_input_case
from autoseg.planning.plans import Plans
from autoseg.preprocessing.preprocess import preprocess_arrays
from autoseg.records import atomic_write_bytes
from autoseg.training.data import extract_window


def preprocess_unlabelled(plans: Plans, configuration: str, folders: list[Path], output: Path) -> list[str]:
    """Every image of ``folders`` preprocessed into ``output``; returns the case ids (``<folder index>_<case>``)."""
    output.mkdir(parents=True, exist_ok=True)
    case_ids = []
    for index, folder in enumerate(folders):
        for case in list_input_cases(Path(folder), plans.num_input_channels):
            case_id = f"{index}_{case.case_id}"  # imagesTr and imagesTs may share names
            case_ids.append(case_id)
            target, source_record = output / f"{case_id}.npy", output / f"{case_id}.source.json"
            # Kept while the same files are behind the name: another --images folder at this position, or an
            # edited image, is preprocessed again (the name alone once reused the other folder's arrays).
            sources = json.dumps([[str(f.resolve()), s.st_size, s.st_mtime_ns] for f in case.files for s in [f.stat()]])
            if target.exists() and source_record.is_file() and source_record.read_text() == sources:
                continue
            image, geometry = read_input_case(case, plans.num_input_channels)
            array = preprocess_arrays(image, None, geometry, plans, configuration).image.astype(np.float32)
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
            atomic_write_bytes(target, buffer.getvalue())
            atomic_write_bytes(source_record, sources.encode())
    if not case_ids:
        raise UsageError(f"no images to pre-train on in {', '.join(map(str, folders))}")
    return case_ids


class UnlabelledPatchSampler:
    """Batches ``(patch, patch)``: a random window of a random image (padded where the image is smaller),
    mirrored at random along each axis. The target is the image itself: the masking happens in the model."""

    def __init__(self, folder: Path, case_ids: list[str], patch_size: list[int], batch_size: int):
        self.folder, self.case_ids = Path(folder), list(case_ids)
        self.patch_size, self.batch_size = list(patch_size), batch_size
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, case_id: str) -> np.ndarray:
        if case_id not in self._arrays:
            self._arrays[case_id] = np.load(self.folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False)
        return self._arrays[case_id]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        patches = []
        for _ in range(self.batch_size):
            image = self._array(self.case_ids[np.random.randint(len(self.case_ids))])
            shape = image.shape[1:]
            if len(self.patch_size) == 2:  # a slice, then a 2D window in it
                z = np.random.randint(shape[0])
                window = [(z, z + 1)] + _random_window(shape[1:], self.patch_size)
                patch = extract_window(image, window, 0.0)[:, 0]
            else:
                patch = extract_window(image, _random_window(shape, self.patch_size), 0.0)
            for axis in range(1, patch.ndim):
                if np.random.rand() < 0.5:
                    patch = np.flip(patch, axis)
            patches.append(np.ascontiguousarray(patch))
        batch = torch.from_numpy(np.stack(patches).astype(np.float32))
        return batch, batch


def _random_window(shape, patch) -> list[tuple[int, int]]:
    starts = [np.random.randint(min(0, s - p), max(0, s - p) + 1) for s, p in zip(shape, patch)]
    return [(start, start + p) for start, p in zip(starts, patch)]
