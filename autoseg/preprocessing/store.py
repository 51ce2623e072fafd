"""The preprocessed store: one folder per configuration, three files per case.

``CASE.npy`` (float32 image, ``(C, Z, Y, X)``), ``CASE_seg.npy`` (int16 class indices,
``(Z, Y, X)``: 0..K-1 for the network's classes, -1 for ignored voxels, -2 for background outside
the non-zero region where a channel is normalised within it) and ``CASE.json``
(the ``CaseProperties``). Uncompressed ``.npy`` is memory-mapped by the training loader,
so a random patch reads only the bytes it needs, and writes are atomic: the ``.json``
is written last and its presence marks a finished case (that is what resuming checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import DatasetError
from autoseg.io.images import Geometry
from autoseg.records import atomic_write_with, load_record, save_json

CASE_SCHEMA_VERSION = 1
IGNORE_INDEX = -1
# Background outside the non-zero region, marked only where some channel is normalised inside it
# (``zscore_mask``): training re-zeroes those channels there after augmentation, as nnU-Net's
# MaskImageTransform does with its -1, then trains the voxels as background.
OUTSIDE_NONZERO = -2
ANNOTATED = "annotated"  # the class_locations key of the annotated (not ignored) voxels


@dataclass
class CaseProperties:
    schema_version: int
    case_id: str
    plans_digest: str  # digest of what shaped this case in the plan; a different one means re-preprocess
    source_images: list[str]
    source_label: str | None
    original_geometry: Geometry
    original_spacing: list[float]  # array order, 3 entries
    crop_box: list[list[int]]  # in the original array, [[start, stop), ...] per axis
    shape_after_crop: list[int]
    shape_after_resampling: list[int]  # of the stored arrays: a 2D configuration's slice axis first
    spacing_after_resampling: list[float]  # array order, 3 entries
    # Per class index (as a string), up to N voxel coordinates of the stored arrays for foreground oversampling;
    # in a partly ignored case also ANNOTATED's: voxels that are not ignored.
    class_locations: dict[str, list[list[int]]] = field(default_factory=dict)
    # Each source file's [size, modification time in ns] when it was read: an edited or replaced raw
    # file makes the case stale even where the plan's digest is the same.
    source_stamps: dict[str, list[int]] = field(default_factory=dict)


def case_paths(folder: str | Path, case_id: str) -> tuple[Path, Path, Path]:
    folder = Path(folder)
    return folder / f"{case_id}.npy", folder / f"{case_id}_seg.npy", folder / f"{case_id}.json"


class _Writes:
    """A file seen only through ``write``: numpy then writes an array in chunks of 16 MB through it, so a
    failed write raises Python's OSError with its reason (a real file goes through ``tofile``, whose
    error says neither why nor where)."""

    def __init__(self, handle):
        self.write = handle.write


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Straight into the file: through a BytesIO, a case took three times its size in memory.
    atomic_write_with(path, lambda handle: np.save(_Writes(handle), np.ascontiguousarray(array), allow_pickle=False))


def save_case(folder: str | Path, properties: CaseProperties, image: np.ndarray, seg: np.ndarray | None) -> None:
    image_path, seg_path, json_path = case_paths(folder, properties.case_id)
    json_path.unlink(missing_ok=True)  # a case rewritten is unfinished until its new properties are written
    _save_npy(image_path, image.astype(np.float32, copy=False))
    if seg is not None:
        _save_npy(seg_path, seg.astype(np.int16, copy=False))
    save_json(properties, json_path)  # last: marks the case complete


def load_properties(folder: str | Path, case_id: str) -> CaseProperties:
    return load_record(CaseProperties, case_paths(folder, case_id)[2], DatasetError, CASE_SCHEMA_VERSION)


def load_arrays(folder: str | Path, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Image ``(C, Z, Y, X)`` and segmentation ``(Z, Y, X)``, memory-mapped by default."""
    image_path, seg_path, _ = case_paths(folder, case_id)
    return _load_npy(image_path, mmap), (_load_npy(seg_path, mmap) if seg_path.exists() else None)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DatasetError(f"preprocessed case cannot be read ({reason}); re-run plan-and-preprocess", path) from None


def source_stamps(files: list[str], root: str | Path) -> dict[str, list[int]]:
    """[size, modification time in ns] of each file and of the files it reads besides itself (a 3D TIFF's
    spacing sidecar, an .mhd's pixel file), keyed by the path under ``root`` (the dataset folder), so a
    dataset moved or mounted elsewhere is not preprocessed again. A missing file: [-1, -1]."""
    from autoseg.io.images import companion_files

    stamps = {}
    for file in [f for name in files for f in (Path(name), *companion_files(Path(name)))]:
        try:
            key = Path(file).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:  # outside the dataset folder (a dataset.json that lists files elsewhere)
            key = str(file)
        try:
            status = Path(file).stat()
            stamps[key] = [status.st_size, status.st_mtime_ns]
        except OSError:
            stamps[key] = [-1, -1]
    return stamps


def check_training_case(folder: str | Path, properties: CaseProperties, plans_digest: str | None = None) -> None:
    """Refuse a case whose arrays are missing, truncated or not of the shape its properties record, or
    that was preprocessed for another plan (``plans_digest``: what plans.json gives now), here and now
    rather than from inside a data-loading worker halfway through an epoch."""
    image_path, seg_path, json_path = case_paths(folder, properties.case_id)
    if plans_digest is not None and properties.plans_digest != plans_digest:
        raise DatasetError("was preprocessed for another plan (plans.json changed since: spacing, normalisation, "
                           "labels), or by an autoseg that stored it otherwise; re-run plan-and-preprocess "
                           "(with --keep-plans to continue a run of this plan)", json_path)
    image, seg = load_arrays(folder, properties.case_id)
    if seg is None:
        raise DatasetError("segmentation is missing; re-run plan-and-preprocess", seg_path)
    for path, shape in ((image_path, list(image.shape[1:])), (seg_path, list(seg.shape))):
        if shape != list(properties.shape_after_resampling):
            raise DatasetError(f"shape {shape} differs from the {properties.shape_after_resampling} recorded in "
                               f"{properties.case_id}.json; re-run plan-and-preprocess", path)


def remove_case(folder: str | Path, case_id: str) -> None:
    """The properties first: a case without them is not finished, whatever else is left."""
    for path in reversed(case_paths(folder, case_id)):
        path.unlink(missing_ok=True)


def list_finished_cases(folder: str | Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if (folder / f"{p.stem}.npy").exists())
