"""Preprocessing: crop to non-zero, normalise, resample; for training cases and new images alike.

``preprocess_arrays`` is the one implementation: ``plan-and-preprocess`` runs it on the
training set and the predictor on each new image, so the two can never disagree.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.dataset.check import read_case
from autoseg.dataset.spec import CaseFiles, DatasetSpec
from autoseg.errors import DatasetError
from autoseg.io.images import Geometry
from autoseg.parallel import map_with_progress
from autoseg.planning.planner import preprocessing_digest
from autoseg.planning.plans import Plans
from autoseg.planning.spacing import resampled_shape, resampling_axis
from autoseg.preprocessing.crop import bounding_box, crop, nonzero_mask
from autoseg.preprocessing.normalize import normalize
from autoseg.preprocessing.resample import resample_image, resample_labels
from autoseg.preprocessing.store import (ANNOTATED, CASE_SCHEMA_VERSION, IGNORE_INDEX, OUTSIDE_NONZERO,
                                         CaseProperties, list_finished_cases, load_properties, remove_case,
                                         save_case, source_stamps)
from autoseg.records import save_json

MAX_LOCATIONS_PER_CLASS = 1000  # sampled voxels per class for foreground oversampling


@dataclass
class Preprocessed:
    image: np.ndarray  # (C, Z, Y, X) float32
    seg: np.ndarray | None  # (Z, Y, X) int16 class indices
    crop_box: list[list[int]]
    shape_after_crop: list[int]
    target_spacing: list[float]  # 3 entries, array order
    # The array axis now first in ``image`` and ``seg`` (a 2D configuration's slice axis; 0: none moved).
    # ``np.moveaxis(image, 1, 1 + moved_axis)`` restores array order.
    moved_axis: int = 0


def target_spacing_3d(plans: Plans, configuration: str, case_spacing: list[float]) -> list[float]:
    """The spacing a case is resampled to (array order); a 2D configuration leaves its slice axis alone."""
    config = plans.configuration(configuration)
    if config.dimensions == 2:
        target = list(config.spacing)
        target.insert(config.slicing_axis, float(case_spacing[config.slicing_axis]))
        return target
    return list(config.spacing)


def stored_slice_axis(plans: Plans, configuration: str) -> int:
    """The array axis that preprocessing moves to the front (after the channels): a 2D configuration's
    slice axis, so that training and prediction take slices across axis 0; 0 (no move) for 3D."""
    config = plans.configuration(configuration)
    return config.slicing_axis if config.dimensions == 2 else 0


def label_lookup(plans: Plans) -> dict[int, int]:
    """Label value -> stored class index (ignore -> -1). Regions keep their values."""
    values = set()
    for value in plans.labels.values():
        values.update(value if isinstance(value, list) else [value])
    if plans.has_regions:
        return {v: (IGNORE_INDEX if v == plans.ignore_label else v) for v in values}
    classes = sorted(v for v in values if v != plans.ignore_label)
    lookup = {v: i for i, v in enumerate(classes)}
    if plans.ignore_label is not None:
        lookup[plans.ignore_label] = IGNORE_INDEX
    return lookup


def class_values(plans: Plans) -> list[int]:
    """Label value of each network output channel (not for region-based plans)."""
    lookup = label_lookup(plans)
    return [v for v, i in sorted(lookup.items(), key=lambda kv: kv[1]) if i >= 0]


def preprocess_arrays(image: np.ndarray, label: np.ndarray | None, geometry: Geometry, plans: Plans,
                      configuration: str) -> Preprocessed:
    config = plans.configuration(configuration)
    mask = nonzero_mask(image)
    box = bounding_box(mask)
    image, mask = crop(image, box), crop(mask, box)
    shape_after_crop = list(image.shape[1:])
    image = normalize(image, plans.normalization, mask)
    spacing = geometry.array_spacing
    target = target_spacing_3d(plans, configuration, spacing)
    new_shape = resampled_shape(shape_after_crop, spacing, target)
    axis = resampling_axis(spacing, target)
    image = resample_image(image, new_shape, config.image_resampling_order, axis)
    seg = None
    if label is not None:
        lookup = label_lookup(plans)
        table = np.zeros(max(lookup) + 1, dtype=np.int16)
        for value, index in lookup.items():
            table[value] = index
        seg = table[crop(label, box)]
        seg = resample_labels(seg, new_shape, config.label_resampling_order, axis)
        if plans.masked_channels and not mask.all():
            # The region resampled on its own, then marked: marked before, the outside background would compete
            # with the labels as a class of its own and let a structure at the region's edge win voxels it loses
            # to the whole background (the labels stay exactly those of an unmarked plan).
            inside = resample_labels(mask.astype(np.int16), new_shape, config.label_resampling_order, axis) > 0
            seg[(seg == 0) & ~inside] = OUTSIDE_NONZERO
    moved = stored_slice_axis(plans, configuration)
    if moved:
        image = np.ascontiguousarray(np.moveaxis(image, 1 + moved, 1))
        seg = None if seg is None else np.ascontiguousarray(np.moveaxis(seg, moved, 0))
    return Preprocessed(image, seg, box, shape_after_crop, target, moved)


def sample_class_locations(seg: np.ndarray, case_id: str) -> dict[str, list[list[int]]]:
    """Up to ``MAX_LOCATIONS_PER_CLASS`` voxels of each foreground class, for foreground oversampling; where
    part of the case is ignored (-1: sparse annotation), also of the annotated voxels (``ANNOTATED``,
    background included), on which the patches that are not forced onto foreground are centred, as in
    nnU-Net: a patch of nothing but ignored voxels has no loss and would waste its step."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))

    def sampled(flat: np.ndarray) -> list[list[int]]:
        if flat.size > MAX_LOCATIONS_PER_CLASS:
            flat = np.sort(rng.choice(flat, MAX_LOCATIONS_PER_CLASS, replace=False))
        return np.stack(np.unravel_index(flat, seg.shape), axis=1).tolist()

    locations = {}
    for index in np.unique(seg):
        if index > 0:
            locations[str(int(index))] = sampled(np.flatnonzero(seg == index))
    if (seg == IGNORE_INDEX).any():
        locations[ANNOTATED] = sampled(np.flatnonzero(seg != IGNORE_INDEX))
    return locations


def _preprocess_one(args) -> str | None:
    case, spec, plans, configuration, output, digest, stamps = args  # stamps taken before reading
    loaded = read_case(case, spec)
    if loaded.problems:
        return "; ".join(loaded.problems)
    result = preprocess_arrays(loaded.image, loaded.label, loaded.geometry, plans, configuration)
    properties = CaseProperties(
        schema_version=CASE_SCHEMA_VERSION, case_id=case.case_id, plans_digest=digest,
        source_images=list(case.images), source_label=case.label, original_geometry=loaded.geometry,
        original_spacing=loaded.geometry.array_spacing, crop_box=result.crop_box,
        shape_after_crop=result.shape_after_crop, shape_after_resampling=list(result.image.shape[1:]),
        spacing_after_resampling=result.target_spacing,
        class_locations=sample_class_locations(result.seg, case.case_id), source_stamps=stamps)
    save_case(output, properties, result.image, result.seg)
    return None


def preprocess_dataset(spec: DatasetSpec, plans: Plans, configuration: str, output_root: Path,
                       num_processes: int = 2, progress: bool = True) -> tuple[int, int]:
    """Preprocess every labelled case into ``output_root/<data_identifier>``; returns (done, skipped).

    Cases whose properties file records the same preprocessing digest and the same source files
    (size and modification time) are skipped, so an interrupted run continues where it stopped and
    an edited raw file is preprocessed again. A case of an older store, without the sizes and times,
    takes the present ones (its digest vouches for it, as it did before). Cases no longer in the
    dataset are removed from this configuration's store, since training takes every case it finds there.
    """
    config = plans.configuration(configuration)
    output = output_root / config.data_identifier
    digest = preprocessing_digest(plans, configuration)
    finished = set(list_finished_cases(output))
    todo, skipped = [], 0
    labelled = [case for case in spec.cases if case.label is not None and case.images]
    for case_id in finished - {case.case_id for case in labelled}:
        remove_case(output, case_id)
    for case in labelled:
        recorded = _recorded(output, case.case_id) if case.case_id in finished else {}
        stamps = source_stamps([*case.images, case.label], spec.root)
        if recorded.get("plans_digest") != digest or recorded.get("source_stamps") not in (None, {}, stamps):
            todo.append((case, spec, plans, configuration, output, digest, stamps))
            continue
        if not recorded.get("source_stamps"):  # written before stamps existed: its digest vouches, as before
            _adopt_stamps(output, case.case_id, stamps)
        skipped += 1
    problems = [p for p in map_with_progress(_preprocess_one, todo, num_processes, f"preprocess {configuration}",
                                             progress) if p]
    if problems:
        raise DatasetError("; ".join(problems[:5]), spec.root)
    return len(todo), skipped


def _adopt_stamps(folder: Path, case_id: str, stamps: dict[str, list[int]]) -> None:
    properties = load_properties(folder, case_id)
    properties.source_stamps = stamps
    save_json(properties, folder / f"{case_id}.json")


def _recorded(folder: Path, case_id: str) -> dict:
    """The case's properties as recorded (empty where unreadable: the case is done again)."""
    import json

    try:
        recorded = json.loads((folder / f"{case_id}.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}
