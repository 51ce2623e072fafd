"""DICOM series with DICOM SEG labels to the nnU-Net v2 raw layout (``autoseg convert-dicom``).

Each image series (``autoseg/io/dicom.py``: same discovery, geometry and refusals as
``predict``) becomes a case; the SEG that references it (ReferencedSeriesSequence) becomes
its label map, placed slice by slice on the series' own instances (highdicom's
``get_pixels_by_source_instance``), so SEGs that omit empty frames work too. Segments are
mapped to label values by their SegmentLabel through ``labels.json``
(``{"segment label": value, ...}``); every segment that is not in it, overlapping segments
of different values, and a series with two SEGs are listed and nothing is written. Series
without a SEG go to ``imagesTs``. RTSTRUCT labels are not supported (the light libraries for
them pull OpenCV): they are listed with that reason.

The dataset is built in a hidden folder beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from autoseg.errors import DatasetCheckFailed, DatasetError, UsageError
from autoseg.io.dicom import DicomSeries, dicom_cases, looks_like_dicom, read_series_pixels, require, write_cases_csv
from autoseg.io.images import write_image, write_label
from autoseg.records import read_json, temporary_folder_name


def read_label_mapping(path: Path) -> dict[str, int]:
    mapping = read_json(path, DatasetError)
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 32767
            for k, v in mapping.items()):
        raise DatasetError('expected {"segment label": label value (1..32767), ...}', path)
    reserved = sorted(set(mapping) & {"background", "ignore"})
    if reserved:  # dataset.json's own names: background is 0, and an ignore label has its own rules
        raise DatasetError(f"segment label '{reserved[0]}' is a name dataset.json reserves; rename it", path)
    if len(set(mapping.values())) != len(mapping):
        raise DatasetError("two segment labels map to the same value", path)
    return mapping


def find_segs(folder: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """SEG files by the SeriesInstanceUID they reference, and one line per label file that cannot be used."""
    pydicom = require("pydicom")
    segs: dict[str, list[Path]] = {}
    problems, rtstructs = [], []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and looks_like_dicom(p)):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
            problems.append(f"{path}: cannot be read as DICOM ({exc})")
            continue
        modality = str(getattr(header, "Modality", ""))
        if modality == "RTSTRUCT":
            rtstructs.append(path)
        elif modality != "SEG":
            continue  # the images themselves, reports, DICOMDIRs: a labels folder may be the whole export
        elif "ReferencedSeriesSequence" not in header:
            problems.append(f"{path}: the SEG references no series (ReferencedSeriesSequence missing)")
        else:
            segs.setdefault(str(header.ReferencedSeriesSequence[0].SeriesInstanceUID), []).append(path)
    if rtstructs:
        message = (f"{len(rtstructs)} RTSTRUCT file(s) ({rtstructs[0]}{', ...' if len(rtstructs) > 1 else ''}): "
                   "RTSTRUCT labels are not supported; convert them to DICOM SEG (e.g. with dcmqi or 3D Slicer)")
        if segs:  # SEGs label the cases; the contours beside them are left out, and said so
            print(f"convert-dicom: warning: {message}; left out", file=sys.stderr)
        else:
            problems.append(message)
    return segs, problems


def _spatial_locations_not_preserved(seg) -> str | None:
    """The SpatialLocationsPreserved value (NO, REORIENTED_ONLY) of a frame whose pixels do not lie where its
    source slice's do, or None; highdicom's ``ignore_spatial_locations``, needed for the many writers that
    leave the attribute out, would otherwise take such frames too."""
    groups = [*getattr(seg, "SharedFunctionalGroupsSequence", []),
              *getattr(seg, "PerFrameFunctionalGroupsSequence", [])]
    values = {str(getattr(source, "SpatialLocationsPreserved", "") or "").upper()
              for group in groups for derivation in getattr(group, "DerivationImageSequence", [])
              for source in getattr(derivation, "SourceImageSequence", [])}
    return next(iter(sorted(values - {"", "YES"})), None)


def seg_label_map(path: Path, series: DicomSeries, mapping: dict[str, int]) -> tuple[np.ndarray | None, list[str]]:
    """The SEG as a label map on ``series``' grid, or None and the reasons it cannot be mapped."""
    hd = require("highdicom")
    try:
        seg = hd.seg.segread(path)
        labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types for a damaged file
        return None, [f"{path}: cannot be read as a DICOM SEG ({exc.__class__.__name__}: {str(exc)[:200]})"]
    unmapped = sorted({label for label in labels.values() if label not in mapping})
    if unmapped:
        return None, [f"{path}: segment label(s) {unmapped} are not in labels.json"]
    if (int(seg.Rows), int(seg.Columns)) != tuple(series.geometry.shape[1:]):
        return None, [f"{path}: frames of {seg.Rows}x{seg.Columns} pixels, series {series.uid} has slices of "
                      f"{series.geometry.shape[1]}x{series.geometry.shape[2]}: not drawn on its grid"]
    moved = _spatial_locations_not_preserved(seg)
    if moved:
        return None, [f"{path}: its frames say SpatialLocationsPreserved {moved} (drawn on a resampled, moved or "
                      f"flipped copy of series {series.uid}): they would land in the wrong place"]
    try:
        # Frames are found through the source instances they reference; SpatialLocationsPreserved is optional
        # and many writers leave it out, which highdicom otherwise refuses.
        masks = seg.get_pixels_by_source_instance(series.instance_uids, segment_numbers=sorted(labels),
                                                  assert_missing_frames_are_empty=True, ignore_spatial_locations=True)
    except Exception as exc:  # noqa: BLE001 - as above: a per-file problem, not an internal error
        return None, [f"{path}: its frames cannot be placed on series {series.uid} "
                      f"({exc.__class__.__name__}: {str(exc)[:200]})"]
    label_map = np.zeros(masks.shape[:3], dtype=np.int16)
    for index, number in enumerate(sorted(labels)):
        inside = masks[..., index] >= 0.5  # a FRACTIONAL SEG's probabilities too, not every non-zero one
        value = mapping[labels[number]]
        clash = inside & (label_map != 0) & (label_map != value)
        if clash.any():
            return None, [f"{path}: segment '{labels[number]}' overlaps another segment of a different value in "
                          f"{int(clash.sum())} voxel(s)"]
        label_map[inside] = value
    return label_map, []


def _why_not_usable(uid: str, refused: list[str]) -> str:
    """Why a series a SEG references is not a case: its refusal (the refused lines are printed only after a
    successful conversion, so without it the user saw no reason), or that no image series has that UID."""
    reasons = [line.split(" refused: ", 1)[-1] for line in refused if f"series {uid} (" in line]
    if reasons:
        return f"which was refused: {reasons[0]}"
    return "which is not among the image series found in the images folder"


def convert_dicom(images: Path, labels: Path, target: Path, mapping_file: Path) -> tuple[int, int, list[str]]:
    """Write the dataset; returns (training cases, test cases, refused series lines)."""
    images, labels, target = Path(images), Path(labels), Path(target)
    for folder in (images, labels):
        if not folder.is_dir():
            raise UsageError("is not a folder", folder)
    if target.exists() and any(target.iterdir()):
        raise UsageError("the target dataset folder exists and is not empty", target)
    mapping = read_label_mapping(mapping_file)
    cases, refused = dicom_cases(images, 1)
    segs, problems = find_segs(labels)
    by_series = {case.channels[0].uid: case for case in cases}
    problems += [f"{paths[0]}: references series {uid}, {_why_not_usable(uid, refused)}"
                 for uid, paths in segs.items() if uid not in by_series]
    problems += [f"{paths[0]}: series {uid} has {len(paths)} SEGs ({', '.join(p.name for p in paths)}); keep one"
                 for uid, paths in segs.items() if len(paths) > 1]
    label_maps = {}
    for case in cases:
        series = case.channels[0]
        if len(segs.get(series.uid, [])) == 1:
            label_maps[case.case_id], why = seg_label_map(segs[series.uid][0], series, mapping)
            problems += why
    if problems:
        raise DatasetCheckFailed(problems, labels)
    tmp = temporary_folder_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for case in cases:
            split = "Tr" if case.case_id in label_maps else "Ts"
            series = case.channels[0]
            pixels = read_series_pixels(series)
            exact = np.array_equal(pixels, np.rint(pixels)) and np.abs(pixels).max(initial=0) < 32768
            write_image(pixels.astype(np.int16) if exact else pixels, tmp / f"images{split}" / f"{case.case_id}_0000.nii.gz",
                        series.geometry)
            if split == "Tr":
                write_label(label_maps[case.case_id], tmp / "labelsTr" / f"{case.case_id}.nii.gz", series.geometry)
        values = {}
        for name, value in mapping.items():
            values.setdefault(value, name)  # several segment labels may share a value: the first names it
        modality = cases[0].channels[0].modality if cases else ""
        description = {
            "channel_names": {"0": "CT" if modality == "CT" else modality or "image"},
            "labels": {"background": 0, **{name: value for value, name in sorted(values.items())}},
            "numTraining": len(label_maps),
            "file_ending": ".nii.gz",
            "name": target.name,
            "description": f"converted from DICOM by autoseg convert-dicom ({images}, {labels})",
        }
        (tmp / "labelsTr").mkdir(parents=True, exist_ok=True)
        (tmp / "imagesTr").mkdir(parents=True, exist_ok=True)
        (tmp / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
        write_cases_csv(cases, tmp / "cases.csv")
        if target.exists():
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(label_maps), len(cases) - len(label_maps), refused
