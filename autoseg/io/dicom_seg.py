"""DICOM Segmentation objects (highdicom): label maps out as SEG, SEG back in as label maps.

A SEG written here references its source series (study, series, every SOP instance, the
frame of reference), holds one BINARY segment per class named as in dataset.json, with a
colour and the algorithm (autoseg's version, the model's dataset, configuration and folds).
Every frame is kept, empty ones included (``omit_empty_frames=False``): the standard allows
both, and a complete SEG describes the source grid on its own, so it can be read back
(evaluate, report) without the source images. A class the model did not find is still
described, with empty frames.

Reading maps segments to label values by their SegmentLabel through dataset.json's names; a
segment whose label is not there is refused with its name, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import AutosegError, ImageReadError, UsageError
from autoseg.io.dicom import DicomSeries, require
from autoseg.io.images import Geometry, read_label
from autoseg.records import atomic_write_with

SEG_ENDING = ".dcm"
# Patient and study attributes of type 2 (present, possibly empty) that highdicom copies from the source image.
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime")


@dataclass
class SegAlgorithm:
    """What produced the segmentation, stored in every segment's algorithm identification."""

    dataset: str
    models: list[str]  # CONFIGURATION__ARCHITECTURE of each ensemble member
    folds: list[str] = field(default_factory=list)


def segment_names(plans) -> dict[int, str]:
    """Label value -> class name of what a model writes (region-based models are refused before: their
    regions overlap, which one segment per written value cannot say)."""
    return {int(v): k for k, v in plans.labels.items() if k not in ("background", "ignore")}


def segment_label(name: str) -> str:
    """A class name as a SegmentLabel holds it: its value representation (LO) keeps at most 64 characters, and
    readers drop spaces at either end as padding."""
    return name[:64].strip()


def check_segment_labels(names: dict[int, str]) -> None:
    """Refuse class names that their SegmentLabel would make equal (once per model, before any case)."""
    cut = [segment_label(name) for name in names.values()]
    clashing = sorted(name for name, label in zip(names.values(), cut) if cut.count(label) > 1)
    if clashing:
        raise UsageError(f"class names {clashing} share their first 64 characters, all a SegmentLabel holds: "
                         "shorten them in dataset.json or write label maps (--output-format nifti)")


def _colours(count: int) -> list[tuple[int, int, int]]:
    from matplotlib import colormaps

    table = colormaps["tab20"].colors
    return [tuple(int(round(255 * c)) for c in table[i % len(table)]) for i in range(count)]


def write_seg(labels_zyx: np.ndarray, series: DicomSeries, names: dict[int, str], algorithm: SegAlgorithm,
              path: Path) -> None:
    """Write the label map (on ``series``' grid, slices in its file order) as a DICOM SEG, atomically."""
    hd, pydicom = require("highdicom"), require("pydicom")
    from pydicom.sr.codedict import codes

    from autoseg import __version__

    present = set(np.unique(labels_zyx).tolist()) - {0}
    if present - set(names):
        raise ValueError(f"label values {sorted(present - set(names))} have no class name")
    check_segment_labels(names)
    values = sorted(names)
    lookup = np.zeros(max(values) + 1, dtype=np.uint16)
    lookup[values] = np.arange(1, len(values) + 1)
    segment_numbers = lookup[np.asarray(labels_zyx, dtype=np.int64)]
    identification = hd.AlgorithmIdentificationSequence(
        name="autoseg", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"dataset": algorithm.dataset, "model": " + ".join(algorithm.models),
                    "folds": " ".join(algorithm.folds) or "all"})
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment_label(names[value]),
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
            tracking_id=f"label {value}", tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*colour))
        for number, (value, colour) in enumerate(zip(values, _colours(len(values))), start=1)]
    sources = [pydicom.dcmread(f) for f in series.files]
    missing = [key for key in ("StudyInstanceUID", "FrameOfReferenceUID") if not sources[0].get(key)]
    if missing:
        raise AutosegError(f"{series.describe()}: no {' or '.join(missing)}, which a DICOM SEG must reference; "
                           "write label maps instead (--output-format nifti)", series.files[0])
    for source in sources:
        for key in TYPE2_COPIED:
            if key not in source:  # may be empty but must be there; anonymisers delete them, highdicom reads them
                setattr(source, key, None)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=segment_numbers,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=9000, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="autoseg", manufacturer_model_name=f"{algorithm.dataset} {' + '.join(algorithm.models)}"[:64],
            software_versions=f"autoseg {__version__}", device_serial_number="none", omit_empty_frames=False,
            series_description=f"autoseg {algorithm.dataset}"[:64])
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom checks the sources' headers (PatientSex
        # "Male", frames of reference that differ between slices): that series' case fails, not the folder
        raise AutosegError(f"{series.describe()}: a DICOM SEG cannot reference it ({type(exc).__name__}: "
                           f"{str(exc)[:200]})", series.files[0]) from None
    atomic_write_with(path, seg.save_as)  # straight to the file: a many-class SEG is gigabytes, copied twice in memory


def is_seg_file(path: str | Path) -> bool:
    return str(path).lower().endswith(SEG_ENDING)


def read_seg(path: str | Path, label_values: dict[str, int], onto: Geometry | None = None
             ) -> tuple[np.ndarray, Geometry]:
    """A SEG as an int16 ``(Z, Y, X)`` label map of dataset label values, and its geometry.

    ``label_values`` maps class names (SegmentLabel) to values. With ``onto`` the masks are
    placed on that grid (which must share the SEG's orientation and in-plane spacing), so a SEG
    that omits empty frames still fits a label map of the whole image; frames that make no
    regular volume (irregular gaps) are then placed one by one by their positions.
    """
    hd = require("highdicom")
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types for a bad file
        raise ImageReadError(f"cannot be read as a DICOM Segmentation ({exc.__class__.__name__}: "
                             f"{str(exc)[:200]})", path) from None
    numbers = list(seg.get_segment_numbers())
    segment_labels = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    # A class name over 64 characters was written cut (write_seg refuses two names the cut makes equal): it is
    # found as its SegmentLabel too.
    known = {**{segment_label(name): value for name, value in label_values.items()}, **label_values}
    unknown = sorted({label for label in segment_labels.values() if label not in known})
    if unknown:
        raise ImageReadError(f"segment label(s) {unknown} are not class names of dataset.json "
                             f"({sorted(label_values)})", path)
    try:
        # Most writers omit empty frames, so the annotated slices may have gaps (a structure on slices 2-3 and 7,
        # or every fifth slice drawn): highdicom (its default, said here because everything below relies on
        # it) spaces them by SpacingBetweenSlices or, where a writer left that out, by the smallest gap, blank
        # between; ``_place`` then puts each slice where it belongs on the image's grid.
        volume = seg.get_volume(combine_segments=True, relabel=False, allow_missing_positions=True)
    except (ValueError, RuntimeError) as exc:
        if onto is None:
            raise ImageReadError(f"segments do not form one regular 3D grid with one class per voxel ({exc})",
                                 path) from None
        volume = None
    lookup = np.zeros(max(numbers) + 1, dtype=np.int16)
    for number, label in segment_labels.items():
        lookup[number] = known[label]
    if volume is None:
        return _frames_onto(seg, lookup, onto, path), onto
    array = lookup[np.asarray(volume.array, dtype=np.int64)]
    geometry = _volume_geometry(volume.affine, array.shape)
    if np.linalg.det(np.reshape(geometry.direction, (3, 3))) < 0:
        array, geometry = _flip_slices(array, geometry)
    return (array, geometry) if onto is None else (_place(array, geometry, onto, path), onto)


def _frame_item(frame, shared, sequence: str):
    """A functional group's item for one frame: its own, else the one shared by all frames."""
    for group in (frame, shared):
        if group is not None and sequence in group:
            return group[sequence].value[0]
    raise ValueError(f"{sequence} missing")


def _frames_onto(seg, lookup: np.ndarray, onto: Geometry, path: Path) -> np.ndarray:
    """Every frame placed by its own position on ``onto``. Frames at gaps that are no multiple of one
    spacing (slices 0, 2 and 5 annotated by a writer that leaves SpacingBetweenSlices out) are no volume
    to highdicom, but each frame still lies on one slice of the image."""
    kind = str(getattr(seg, "SegmentationType", "BINARY")).upper()
    maximum = float(getattr(seg, "MaximumFractionalValue", 1) or 1)
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    direction = np.reshape(onto.direction, (3, 3))  # columns: the image's x, y, z axes
    if (int(seg.Rows), int(seg.Columns)) != tuple(onto.shape[1:]):
        raise ImageReadError(f"frames of {seg.Rows}x{seg.Columns} pixels, the image's slices are "
                             f"{onto.shape[1]}x{onto.shape[2]}", path)
    placed = np.zeros(onto.shape, dtype=np.int16)
    try:
        for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
            orientation = np.array(_frame_item(frame, shared, "PlaneOrientationSequence").ImageOrientationPatient,
                                   dtype=float)
            spacing = [float(v) for v in _frame_item(frame, shared, "PixelMeasuresSequence").PixelSpacing]
            position = np.array(_frame_item(frame, shared, "PlanePositionSequence").ImagePositionPatient, dtype=float)
            voxel = _voxel_of(position, onto)  # (x, y, z) of the frame's first pixel
            z = int(round(voxel[2]))
            # PixelSpacing is (between rows, between columns): the image's (y, x) spacing.
            if not (np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-3)
                    and np.allclose(spacing, [onto.spacing[1], onto.spacing[0]], rtol=1e-3)
                    and np.abs(voxel - [0, 0, z]).max() <= 1e-2 and 0 <= z < onto.shape[0]):
                raise ImageReadError(f"frame {index + 1} does not lie on a slice of the image's grid (at voxel "
                                     f"{voxel.round(3).tolist()}, orientation {orientation.tolist()}, spacing "
                                     f"{spacing})", path)
            stored = np.asarray(seg.get_stored_frame(index + 1))
            if kind == "LABELMAP":  # the pixels are segment numbers
                values = lookup[np.clip(stored.astype(np.int64), 0, len(lookup) - 1)]
            else:
                number = int(_frame_item(frame, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
                inside = stored >= 0.5 * maximum if kind == "FRACTIONAL" else stored > 0
                values = np.where(inside, lookup[number], 0).astype(np.int16)
            clash = (values != 0) & (placed[z] != 0) & (placed[z] != values)
            if clash.any():
                raise ImageReadError(f"segments of different classes overlap in {int(clash.sum())} voxel(s) of "
                                     f"slice {z}", path)
            placed[z] = np.where(values != 0, values, placed[z])
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:  # a frame without its position
        raise ImageReadError(f"its frames cannot be placed on the image's grid ({exc.__class__.__name__}: {exc})",
                             path) from None
    return placed


def _voxel_of(point, onto: Geometry) -> np.ndarray:
    """The (x, y, z) voxel index of world point ``point`` on ``onto``'s grid, not rounded: how far it is from a
    whole number tells whether the point lies on the grid."""
    direction = np.reshape(onto.direction, (3, 3))  # columns: the image's x, y, z axes
    return np.linalg.solve(direction * np.array(onto.spacing), np.subtract(point, onto.origin))


def _volume_geometry(affine: np.ndarray, shape) -> Geometry:
    """highdicom's affine (array axes slices, rows, columns -> LPS) as ITK's (x, y, z) geometry."""
    axes = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]  # x: along a row, y: down the rows, z: across slices
    spacing = [float(np.linalg.norm(a)) for a in axes]
    direction = np.stack([a / s for a, s in zip(axes, spacing)], axis=1)
    return Geometry(shape=list(shape), spacing=spacing, origin=[float(v) for v in affine[:3, 3]],
                    direction=[float(v) for v in direction.ravel()])


def _flip_slices(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """Slices ordered along row x column, as DICOM series are read, so both give the same grid."""
    direction = np.reshape(geometry.direction, (3, 3)).copy()
    origin = np.array(geometry.origin) + (array.shape[0] - 1) * geometry.spacing[2] * direction[:, 2]
    direction[:, 2] *= -1
    return array[::-1].copy(), Geometry(geometry.shape, geometry.spacing, origin.tolist(), direction.ravel().tolist())


def _place(array: np.ndarray, geometry: Geometry, onto: Geometry, path: Path) -> np.ndarray:
    """The SEG's slices on the image's grid; its slice spacing may be a whole multiple of the image's (a SEG
    annotating every Nth slice, empty frames omitted), the slices between stay background."""
    step = 1
    if array.shape[0] > 1:
        ratio = geometry.spacing[2] / onto.spacing[2]
        step = max(1, int(round(ratio)))
    if not (np.allclose(geometry.direction, onto.direction, atol=1e-3)
            and np.allclose(geometry.spacing[:2], onto.spacing[:2], rtol=1e-3)
            and (array.shape[0] == 1 or np.isclose(geometry.spacing[2], step * onto.spacing[2], rtol=1e-3))):
        raise ImageReadError(f"its grid (spacing {geometry.spacing}, direction {geometry.direction}) differs from "
                             f"the image's ({onto.spacing}, {onto.direction})", path)
    index = _voxel_of(geometry.origin, onto)[::-1]
    start = np.rint(index).astype(int)  # (z, y, x)
    end = start + [(array.shape[0] - 1) * step + 1, *array.shape[1:]]
    if np.abs(index - start).max() > 1e-2 or (start < 0).any() or (end > onto.shape).any():
        raise ImageReadError(f"its frames do not lie on the image's grid (offset {index.round(3).tolist()} voxels)", path)
    placed = np.zeros(onto.shape, dtype=np.int16)
    placed[start[0]:end[0]:step, start[1]:end[1], start[2]:end[2]] = array
    return placed


def read_any_label(path: str | Path, label_values: dict[str, int], onto: Geometry | None = None
                   ) -> tuple[np.ndarray, Geometry]:
    """A label map from an image file, or from a DICOM SEG (``.dcm``) through the class names."""
    if is_seg_file(path):
        return read_seg(path, label_values, onto)
    return read_label(path)
