"""DICOM series with DICOM SEG labels to the nnU-Net v2 raw layout (``autoseg convert-dicom``).

Each image series (``autoseg/io/dicom.py``: same discovery, geometry and refusals as
``predict``) becomes a case, or with channel patterns each study's series they pick, one per
channel; the SEG that references it (ReferencedSeriesSequence; any channel's) becomes
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
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from autoseg.errors import DatasetCheckFailed, DatasetError, UsageError
from autoseg.io.dicom import (DicomCase, DicomListing, DicomSeries, dicom_cases, looks_like_dicom, read_series_pixels,
                              require, write_cases_csv)
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


def _of_one_modality(listing: DicomListing, chosen: str | None, images: Path
                     ) -> tuple[DicomListing, list[DicomSeries], list[str]]:
    """(the listing kept, the series left out, problems). A dataset's channel holds one kind of image,
    normalised by the modality of its first case (CT's fixed window would be wrong for a PET), so an
    export of several modalities (PET/CT) is refused unless ``chosen`` (--modality) names the one to
    convert; the others, refused series among them, are left out."""
    by_modality: dict[str, list[DicomCase]] = {}
    for case in listing.cases:
        by_modality.setdefault(_modality(case.channels[0]), []).append(case)
    if chosen is None:
        if len(by_modality) > 1:
            return listing, [], [f"{images}: the image series are of several modalities: {_counts(by_modality)}; a "
                                 "dataset holds one kind of image per channel: convert one with --modality (e.g. "
                                 f"--modality {sorted(by_modality)[0]})"]
        return listing, [], []
    wanted = chosen.upper()

    def chosen_kind(series: DicomSeries) -> bool:
        return _modality(series).upper() == wanted

    kept = DicomListing([c for c in listing.cases if chosen_kind(c.channels[0])],
                        [r for r in listing.refused if r.series is None or chosen_kind(r.series)], listing.passed_over)
    left_out = [c.channels[0] for c in listing.cases if not chosen_kind(c.channels[0])] + \
               [r.series for r in listing.refused if r.series is not None and not chosen_kind(r.series)]
    if not kept.cases and not kept.refused:
        return kept, left_out, [f"{images}: no image series of modality {wanted} (found: "
                                f"{_counts(by_modality) or 'none'})"]
    return kept, left_out, []


def _modality(series: DicomSeries) -> str:
    """The series' Modality, as grouped and reported here (a header without one groups as "missing")."""
    return series.modality or "missing"


def _counts(by_modality: dict[str, list[DicomCase]]) -> str:
    return ", ".join(f"{modality} ({len(group)} series, e.g. {group[0].case_id})"
                     for modality, group in sorted(by_modality.items()))


def _channel_problems(cases: list[DicomCase], patterns: list[str], images: Path) -> list[str]:
    """Several channels: each must hold one kind of image (its normalisation is planned per channel) and
    every case's channels must lie on its first channel's grid (the files share one geometry)."""
    problems = []
    for index, pattern in enumerate(patterns):
        modalities = sorted({_modality(case.channels[index]) for case in cases})
        if len(modalities) > 1:
            problems.append(f"{images}: channel {index} ('{pattern}') picks series of several modalities "
                            f"({', '.join(modalities)}); make its pattern pick one kind of image")
    for case in cases:
        for series in case.channels[1:]:
            mismatch = series.geometry.matches(case.channels[0].geometry)
            if mismatch:
                problems.append(f"{series.files[0]}: {series.describe()} does not lie on the grid of case "
                                f"{case.case_id}'s first channel ({'; '.join(mismatch)}); resample it first")
    return problems


# Channel names that planning reads as a normalisation (``planning/normalization.py``), lower-cased.
NORMALISATION_NAMES = {"ct", "nonorm", "rgb_to_0_1", "rescale_to_0_1"}


def _channel_name(index: int, pattern: str | None, modality: str) -> str:
    """dataset.json's name of a channel: CT for CT (its fixed window normalisation), else the pattern's words
    (``pattern`` None: one channel, converted without patterns), else the modality."""
    if modality == "CT":
        return "CT"
    words = re.sub(r"[*?\[\]]+", " ", pattern or "").strip()
    if words.lower() in NORMALISATION_NAMES:  # '*CT*' picking a PET would give it CT's window
        words = ""
    return words or modality or ("image" if pattern is None else f"channel {index}")


def convert_dicom(images: Path, labels: Path, target: Path, mapping_file: Path, modality: str | None = None,
                  channel_patterns: list[str] | None = None) -> tuple[int, int, list[str]]:
    """Write the dataset; returns (training cases, test cases, refused series lines). ``modality`` keeps the
    series of that modality only (an export of several must name one); ``channel_patterns`` (one
    SeriesDescription glob per channel, as ``predict --dicom-channels``) make each case of one series per
    channel within a study, the SEG referencing any of them."""
    images, labels, target = Path(images), Path(labels), Path(target)
    for folder in (images, labels):
        if not folder.is_dir():
            raise UsageError("is not a folder", folder)
    if target.exists() and any(target.iterdir()):
        raise UsageError("the target dataset folder exists and is not empty", target)
    if channel_patterns and modality:
        raise UsageError("--modality is for one channel; with --dicom-channels each pattern picks its channel")
    mapping = read_label_mapping(mapping_file)
    if channel_patterns:
        listing, left_out = dicom_cases(images, len(channel_patterns), channel_patterns), []
        problems = _channel_problems(listing.cases, channel_patterns, images)
    else:
        listing, left_out, problems = _of_one_modality(dicom_cases(images, 1), modality, images)
    cases = listing.cases
    segs, seg_problems = find_segs(labels)
    problems += seg_problems
    if left_out:
        print(f"convert-dicom: note: {len(left_out)} series of modalities other than {modality.upper()} left out "
              f"({', '.join(sorted({_modality(s) for s in left_out}))}), with their SEGs", file=sys.stderr)
        for series in left_out:
            segs.pop(series.uid, None)
    by_series = {series.uid: case for case in cases for series in case.channels}
    # The refused series are printed only after a successful conversion: the reason goes with the SEG's line.
    problems += [f"{paths[0]}: references series {uid}, {listing.why_not_a_case(uid)}"
                 for uid, paths in segs.items() if uid not in by_series]
    problems += [f"{paths[0]}: series {uid} has {len(paths)} SEGs ({', '.join(p.name for p in paths)}); keep one"
                 for uid, paths in segs.items() if len(paths) > 1]
    label_maps = {}
    for case in cases:
        labelled = [series for series in case.channels if len(segs.get(series.uid, [])) == 1]
        if len(labelled) > 1:
            problems.append(f"{segs[labelled[1].uid][0]}: case {case.case_id} has a SEG on {len(labelled)} of its "
                            f"channels ({', '.join(segs[s.uid][0].name for s in labelled)}); keep one")
        elif labelled:  # placed on the series it was drawn on, which lies on the first channel's grid
            series = labelled[0]
            label_maps[case.case_id], why = seg_label_map(segs[series.uid][0], series, mapping)
            problems += why
    if problems:
        raise DatasetCheckFailed(problems, labels)
    tmp = temporary_folder_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for case in cases:
            split = "Tr" if case.case_id in label_maps else "Ts"
            geometry = case.channels[0].geometry  # every channel's (checked above), as predict stacks them
            for index, series in enumerate(case.channels):
                pixels = read_series_pixels(series)
                exact = np.array_equal(pixels, np.rint(pixels)) and np.abs(pixels).max(initial=0) < 32768
                write_image(pixels.astype(np.int16) if exact else pixels,
                            tmp / f"images{split}" / f"{case.case_id}_{index:04d}.nii.gz", geometry)
            if split == "Tr":
                write_label(label_maps[case.case_id], tmp / "labelsTr" / f"{case.case_id}.nii.gz", geometry)
        values = {}
        for name, value in mapping.items():
            values.setdefault(value, name)  # several segment labels may share a value: the first names it
        patterns = channel_patterns or [None]
        modalities = [cases[0].channels[index].modality if cases else "" for index in range(len(patterns))]
        description = {
            "channel_names": {str(index): _channel_name(index, pattern, modality)
                              for index, (pattern, modality) in enumerate(zip(patterns, modalities))},
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
    return len(label_maps), len(cases) - len(label_maps), listing.refused_lines()
