"""DICOM series as cases: discovery, geometry from the headers, refusal reasons, ``cases.csv``.

A folder (searched recursively) may hold one series per subfolder or many series mixed in
one folder; files are grouped by SeriesInstanceUID, whatever their names or order. The
geometry is computed from the headers, never from SliceThickness: slices are ordered by
their ImagePositionPatient along the normal of ImageOrientationPatient (row x column, as
ITK and GDCM do), the slice spacing is the distance between neighbouring positions. A
series autoseg cannot represent faithfully as one regular grid is refused with the reason
(non-image objects, multi-frame files, mixed orientations or sizes, gantry tilt, missing or
duplicated slices); the other series are still used. Pixels are read by SimpleITK/GDCM,
which applies each slice's RescaleSlope/RescaleIntercept.

pydicom is an optional dependency (``pip install autoseg[dicom]``): a folder without DICOM
files never imports it.
"""

from __future__ import annotations

import csv
import fnmatch
import importlib
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import AutosegError, ImageReadError, UsageError
from autoseg.io.images import MAX_VOXELS, Geometry, intensity_problem
from autoseg.records import atomic_write_bytes

# Modalities of DICOM objects that are not images to segment (they may sit beside the series).
NOT_AN_IMAGE = "not an image"
NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture image storage; its multi-frame kinds add ".N"
# Slice gaps may differ by this fraction of their mean (positions are rounded decimal strings).
GAP_TOLERANCE = 0.01
# Largest distance (mm) a slice position may lie off the line along the slice normal.
TILT_TOLERANCE_MM = 0.01


def require(module: str):
    """Import an optional DICOM dependency, or say in one line what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"DICOM support needs the package '{module}': pip install 'autoseg[dicom]'") from None


@dataclass
class DicomSeries:
    """One series: its files in slice order and, when it can be used, its geometry."""

    uid: str
    files: list[Path]
    study_uid: str = ""
    patient_id: str = ""
    study_date: str = ""
    series_number: str = ""
    description: str = ""
    modality: str = ""
    instance_uids: list[str] = field(default_factory=list)  # SOPInstanceUID of each file, in slice order
    geometry: Geometry | None = None
    problem: str | None = None  # why the series is not a case
    # What the object is when it is no image to segment ("Modality SR", "localizer"): passed over, not refused.
    not_an_image: str = ""

    def describe(self) -> str:
        folders = sorted({str(f.parent) for f in self.files})
        where = folders[0] if len(folders) == 1 else f"{len(folders)} folders"
        return f"series {self.uid} ({self.description or 'no description'}, {len(self.files)} file(s) in {where})"


@dataclass
class DicomCase:
    case_id: str
    channels: list[DicomSeries] = field(default_factory=list)


@dataclass
class RefusedSeries:
    """A series that cannot be a case, or (several channels) a study whose series the patterns cannot pick."""

    reason: str
    file: Path  # the file the message names
    series: DicomSeries | None = None  # None: the whole study ``study_uid`` is refused
    study_uid: str = ""

    def line(self) -> str:
        what = self.series.describe() if self.series is not None else f"study {self.study_uid}"
        return AutosegError(f"{what} refused: {self.reason}", self.file).one_line()


@dataclass
class DicomListing:
    """What a DICOM folder holds: its cases, the series refused (with why) and the objects passed over."""

    cases: list[DicomCase]
    refused: list[RefusedSeries]
    passed_over: list[DicomSeries]  # SEGs, reports, localizers: no images to segment, so no error either
    # Several channels: usable series that no channel pattern picked (a study's other sequences).
    not_picked: list[DicomSeries] = field(default_factory=list)

    def refused_lines(self) -> list[str]:
        return [refused.line() for refused in self.refused]

    def why_not_a_case(self, uid: str) -> str:
        """Why the series ``uid`` is no case, as a clause: "which was refused: ..."."""
        refused = next((r for r in self.refused if r.series is not None and r.series.uid == uid), None)
        if refused is not None:
            return f"which was refused: {refused.reason}"
        other = next((s for s in self.passed_over if s.uid == uid), None)
        if other is not None:
            return f"which is no image to segment ({other.not_an_image}) and was passed over"
        other = next((s for s in self.not_picked if s.uid == uid), None)
        if other is not None:
            study = next((r for r in self.refused if r.series is None and r.study_uid == other.study_uid), None)
            if study is not None:
                return f"whose study was refused: {study.reason}"
            return f"which no channel pattern picked (SeriesDescription '{other.description}')"
        return "which is not among the image series found in the images folder"


def looks_like_dicom(path: Path) -> bool:
    """The DICM preamble (written by every conforming writer), or a .dcm name."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _dicom_files(folder: Path):
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts) and looks_like_dicom(path):
            yield path


def is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` (or a subfolder) holds a DICOM file; stops at the first."""
    return Path(folder).is_dir() and next(_dicom_files(Path(folder)), None) is not None


def find_series(folder: Path) -> list[DicomSeries]:
    """Every series under ``folder``, examined; unreadable files become refused one-file series."""
    pydicom = require("pydicom")
    groups: dict[str, list[tuple[Path, object]]] = {}
    broken: list[DicomSeries] = []
    for path in _dicom_files(Path(folder)):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
            broken.append(DicomSeries(str(path), [path], problem=f"cannot be read as DICOM ({exc})"))
            continue
        uid = str(getattr(header, "SeriesInstanceUID", "")) or f"no SeriesInstanceUID: {path}"
        groups.setdefault(uid, []).append((path, header))
    return [examine_series(uid, items) for uid, items in sorted(groups.items())] + broken


def examine_series(uid: str, items: list[tuple[Path, object]]) -> DicomSeries:
    """The series with its files sorted and its geometry, or with ``problem`` saying why it is refused."""
    first = items[0][1]
    series = DicomSeries(uid, [p for p, _ in items], str(getattr(first, "StudyInstanceUID", "")),
                         str(getattr(first, "PatientID", "")), str(getattr(first, "StudyDate", "")),
                         str(getattr(first, "SeriesNumber", "")), str(getattr(first, "SeriesDescription", "")),
                         str(getattr(first, "Modality", "")))
    try:
        series.not_an_image = _not_an_image(first)
        if series.not_an_image:
            series.problem = f"{NOT_AN_IMAGE} ({series.not_an_image})"
            return series
        series.problem = _refusal(items)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:  # a value no checker foresaw
        series.problem = f"malformed header ({type(exc).__name__}: {exc})"
    if series.problem is None:
        order, series.geometry = _geometry(items)
        series.files = [items[i][0] for i in order]
        series.instance_uids = [str(getattr(items[i][1], "SOPInstanceUID", "")) for i in order]
        if int(np.prod(series.geometry.shape)) > MAX_VOXELS:
            series.problem, series.geometry = f"{series.geometry.shape} voxels exceed AUTOSEG_MAX_VOXELS", None
    return series


def _not_an_image(first) -> str:
    """What the object is when it is no image to segment (by its first file), or ''."""
    modality = str(getattr(first, "Modality", ""))
    if modality in NOT_IMAGES or "Rows" not in first:
        return f"Modality {modality or 'missing'}"
    # Scouts and screenshots (a dose report is one, with Modality CT) are in most CT exports: refused, they made
    # every run end in exit code 2. A secondary capture that is placed in space may be a derived volume: kept.
    image_type = first.get("ImageType") or []
    if "LOCALIZER" in {str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)}:
        return "localizer"
    sop_class = str(first.get("SOPClassUID", ""))
    if (sop_class == SECONDARY_CAPTURE or sop_class.startswith(f"{SECONDARY_CAPTURE}.")) \
            and not first.get("ImagePositionPatient"):
        return "secondary capture without a position"
    return ""


def _refusal(items) -> str | None:
    """Why these image headers do not make one regular 3D grid, or None."""
    headers = [h for _, h in items]
    first = headers[0]
    if any(int(getattr(h, "NumberOfFrames", 1) or 1) > 1 for h in headers):
        return "multi-frame files are not supported (export the series as one file per slice)"
    if any(int(getattr(h, "SamplesPerPixel", 1)) != 1 for h in headers):
        return "colour images (SamplesPerPixel > 1) are not supported"
    for path, header in items:
        problem = _placement_problem(header)
        if problem:  # anonymisers blank these; one such slice names its file, not "internal error"
            return f"{path.name}: {problem}, so the slices cannot be placed in space"
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        return f"mixed orientations ({len(np.unique(orientations.round(4), axis=0))} different ImageOrientationPatient)"
    row, column = orientations[0][:3], orientations[0][3:]
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(column), 1, atol=1e-3)
            and abs(row @ column) < 1e-3):
        return f"ImageOrientationPatient {orientations[0].tolist()} is not two orthonormal vectors"
    sizes = {(int(h.Rows), int(h.Columns), *[round(float(v), 6) for v in h.PixelSpacing]) for h in headers}
    if len(sizes) > 1:
        return f"slices of different size or pixel spacing: {sorted(sizes)}"
    if len(headers) < 2:
        return "a single slice: autoseg reads DICOM volumes of two or more slices"
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    normal = _axes(orientations[0])[2]
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if steps.min() < 1e-3:
        duplicates = int((steps < 1e-3).sum())
        return f"duplicated slices: {duplicates} slice(s) share a position with another"
    off_line = positions[order] - positions[order[0]] - np.outer(along[order] - along[order[0]], normal)
    if np.abs(off_line).max() > TILT_TOLERANCE_MM:
        tilt = getattr(first, "GantryDetectorTilt", None)
        return (f"gantry tilt or sheared slices: slice positions leave the slice normal by up to "
                f"{np.abs(off_line).max():.3g} mm (GantryDetectorTilt {tilt}); resample it to an upright grid first")
    mean_step = (along[order[-1]] - along[order[0]]) / (len(steps))
    if np.abs(steps - mean_step).max() > GAP_TOLERANCE * mean_step:
        return (f"missing slice(s) or non-uniform spacing: gaps between slice positions range from "
                f"{steps.min():.4g} to {steps.max():.4g} mm")
    return None


# The numbers each slice needs to be placed: position (x, y, z), orientation (row and column cosines), spacing.
PLACEMENT_VALUES = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}


def _placement_problem(header) -> str | None:
    """What is wrong with one slice's placement values, or None."""
    from pydicom.multival import MultiValue

    for key, count in PLACEMENT_VALUES.items():
        try:
            value = header.get(key)  # None where absent; None or "" where present but empty (anonymised)
            if value is None or (isinstance(value, str) and not value.strip()):
                values = []
            else:  # several values come as a MultiValue, one as a scalar (DSfloat, or DSdecimal if so configured)
                values = list(value) if isinstance(value, (list, MultiValue)) else [value]
            numbers = [float(v) for v in values]
        except (TypeError, ValueError) as exc:  # pydicom parses a DS value as it is read: "1,5" fails there
            return f"{key} is not {count} numbers ({exc})"
        if not numbers:
            return f"{key} is missing or empty"
        if len(numbers) != count or not np.all(np.isfinite(numbers)):
            return f"{key} {numbers} is not {count} finite numbers"
        if key == "PixelSpacing" and min(numbers) <= 0:
            return f"PixelSpacing {numbers} is not positive"
    return None


def _axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and slice-normal unit vectors of an ImageOrientationPatient that passed the orthonormality
    check. Scanners write the cosines rounded: made exactly orthonormal here, because an un-normalised normal
    of norm 1 + e misplaces each slice by e times its distance from the first (0.1 mm over 300 mm at
    e = 3e-4, beyond the tilt tolerance) and would give the image a direction that is not a rotation."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    column = orientation[3:] - (orientation[3:] @ row) * row
    column = column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


def _geometry(items) -> tuple[np.ndarray, Geometry]:
    """Slice order and geometry of a series that passed ``_refusal``."""
    headers = [h for _, h in items]
    row, column, normal = _axes(np.array([float(v) for v in headers[0].ImageOrientationPatient]))
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slice_spacing = (along[order[-1]] - along[order[0]]) / (len(order) - 1)
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)  # between rows, between columns
    direction = np.stack([row, column, normal], axis=1)  # columns: the x, y, z axes in patient space
    geometry = Geometry(shape=[len(order), int(headers[0].Rows), int(headers[0].Columns)],
                        spacing=[column_spacing, row_spacing, float(slice_spacing)],
                        origin=[float(v) for v in positions[order[0]]], direction=[float(v) for v in direction.ravel()])
    return order, geometry


def read_series_pixels(series: DicomSeries) -> np.ndarray:
    """``(Z, Y, X)`` float32 intensities after each slice's rescale slope and intercept."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # so a slice with another rescale cannot be truncated
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"pixels of {series.describe()} cannot be read ({str(exc).strip().splitlines()[-1][:200]})",
                             series.files[0]) from None
    array = sitk.GetArrayFromImage(image)
    if list(array.shape) != series.geometry.shape:
        raise ImageReadError(f"{series.describe()}: pixels {list(array.shape)} differ from the headers' "
                             f"{series.geometry.shape}", series.files[0])
    return array


def read_dicom_case(case: DicomCase, num_channels: int) -> tuple[np.ndarray, Geometry]:
    """``(C, Z, Y, X)`` float32 and the geometry of the first channel's series."""
    if len(case.channels) != num_channels:
        raise AutosegError(f"case {case.case_id} has {len(case.channels)} series, the model expects {num_channels} "
                           "channels (see --dicom-channels)", case.channels[0].files[0])
    geometry = case.channels[0].geometry
    arrays = []
    for series in case.channels:
        problems = series.geometry.matches(geometry)
        if problems:
            raise AutosegError(f"{series.describe()} does not lie on the grid of the first channel: "
                               f"{'; '.join(problems)}", series.files[0])
        array = read_series_pixels(series)
        problem = intensity_problem(array)
        if problem:
            raise AutosegError(f"{series.describe()}: {problem}", series.files[0])
        arrays.append(array)
    return np.stack(arrays), geometry


def case_name(series: DicomSeries) -> str:
    """PatientID_StudyDate_SeriesNumber, file-name safe; '' when one of them is missing."""
    parts = [series.patient_id, series.study_date, series.series_number]
    if not all(p.strip() for p in parts):
        return ""
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p.strip()) for p in parts)


def dicom_cases(folder: Path, num_channels: int, channel_patterns: list[str] | None = None) -> DicomListing:
    """The cases of a DICOM folder, the series refused and the objects passed over.

    One channel: every image series is a case. Several: ``channel_patterns`` (one
    SeriesDescription glob per channel, case-insensitive) pick, within each study, exactly one
    series per channel; a study where a pattern matches none or several is refused.
    """
    series = find_series(Path(folder))
    # Objects that are no images at all (SEGs, structure sets, reports, key objects: any real export holds
    # some) are passed over with a note; counted as refused, they made every run end in exit code 2.
    passed_over = [s for s in series if s.not_an_image]
    if passed_over:
        kinds = sorted({s.not_an_image for s in passed_over})
        print(f"autoseg: note: {len(passed_over)} DICOM series that are no images passed over ({', '.join(kinds)})",
              file=sys.stderr)
    refused = [RefusedSeries(s.problem, s.files[0], s) for s in series if s.problem and not s.not_an_image]
    usable = [s for s in series if s.problem is None]
    if channel_patterns and len(channel_patterns) != num_channels:
        raise UsageError(f"--dicom-channels gives {len(channel_patterns)} pattern(s), the model expects {num_channels}")
    if num_channels > 1 and not channel_patterns:
        raise UsageError(f"the model expects {num_channels} channels: give --dicom-channels with one SeriesDescription "
                         "pattern per channel, in channel order (e.g. --dicom-channels '*T1*' '*FLAIR*')", folder)
    if not channel_patterns:
        groups = [[s] for s in usable]
    else:
        groups = []
        for study in sorted({s.study_uid for s in usable}):
            members = [s for s in usable if s.study_uid == study]
            picked = [[s for s in members if fnmatch.fnmatch(s.description.lower(), p.lower())] for p in channel_patterns]
            wrong = [f"pattern '{p}' matches {len(m)} series" for p, m in zip(channel_patterns, picked) if len(m) != 1]
            if wrong:
                refused.append(RefusedSeries(f"{'; '.join(wrong)} (descriptions: "
                                             f"{sorted(s.description for s in members)})", members[0].files[0],
                                             study_uid=study))
            else:
                groups.append([m[0] for m in picked])
    names = [case_name(g[0]) for g in groups]
    cases = [DicomCase(name if name and names.count(name) == 1 else g[0].uid, g) for name, g in zip(names, groups)]
    picked = {id(s) for g in groups for s in g}
    return DicomListing(sorted(cases, key=lambda c: c.case_id), refused, passed_over,
                        [s for s in usable if id(s) not in picked])


def cases_csv(cases: list[DicomCase]) -> bytes:
    """Which series each case name stands for."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "channel", "series_instance_uid", "study_instance_uid", "patient_id", "study_date",
                     "series_number", "series_description", "folder"])
    for case in cases:
        for channel, s in enumerate(case.channels):
            writer.writerow([case.case_id, channel, s.uid, s.study_uid, s.patient_id, s.study_date, s.series_number,
                             s.description, str(s.files[0].parent)])
    return buffer.getvalue().encode()


def write_cases_csv(cases: list[DicomCase], path: Path) -> None:
    atomic_write_bytes(path, cases_csv(cases))
