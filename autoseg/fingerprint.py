"""The dataset fingerprint: what the planner needs to know about a dataset, measured once.

Per case: spacing, shape before and after cropping to non-zero, foreground intensity
statistics per channel, voxel counts and connected components per class. Per dataset:
the medians the planner uses and intensity statistics pooled over sampled foreground
voxels of every case (CT normalisation is built from these).

Deterministic: voxels are sampled with a generator seeded by the case id, cases are
sorted, and floats are written with a fixed precision, so the same dataset gives a
byte-identical ``dataset_fingerprint.json`` whatever ``-np`` is.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.dataset.check import dataset_level_problems, raise_if_problems, read_case
from autoseg.dataset.spec import CaseFiles, DatasetSpec, load_dataset_spec
from autoseg.errors import DatasetError
from autoseg.parallel import map_with_progress
from autoseg.preprocessing.crop import bounding_box, crop, nonzero_mask
from autoseg.records import load_record, save_json

FINGERPRINT_SCHEMA_VERSION = 1
SAMPLES_PER_CASE = 10_000
MAX_COMPONENT_SIZES = 20  # largest components listed per class and case


@dataclass
class IntensityStats:
    mean: float
    std: float
    min: float
    max: float
    median: float
    percentile_00_5: float
    percentile_99_5: float
    num_samples: int

    @classmethod
    def of(cls, values: np.ndarray) -> "IntensityStats":
        if values.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        values = values.astype(np.float64)
        low, median, high = np.percentile(values, [0.5, 50.0, 99.5])
        return cls(float(values.mean()), float(values.std()), float(values.min()), float(values.max()),
                   float(median), float(low), float(high), int(values.size))


@dataclass
class ClassStats:
    voxels: int
    num_components: int
    largest_components: list[int]  # voxel counts, largest first


@dataclass
class CaseFingerprint:
    case_id: str
    spacing: list[float]  # array order, 3 entries
    shape_before_crop: list[int]
    shape_after_crop: list[int]
    crop_box: list[list[int]]
    intensity: list[IntensityStats]  # per channel, over the case's foreground
    classes: dict[str, ClassStats]  # by label value

    @property
    def anisotropy(self) -> float:
        real = [s for s in self.spacing if s != 999.0]
        return max(real) / min(real)


@dataclass
class DatasetFingerprint:
    schema_version: int
    dataset_name: str
    channel_names: list[str]
    label_values: list[int]
    is_2d: bool
    cases: list[CaseFingerprint]
    foreground_intensity: list[IntensityStats]  # per channel, pooled over sampled voxels of all cases
    median_spacing: list[float]
    median_shape_after_crop: list[int]
    median_relative_size_after_crop: float
    max_anisotropy: float
    notes: list[str] = field(default_factory=list)


def fingerprint_case(args: tuple[CaseFiles, DatasetSpec]) -> tuple[list[str], CaseFingerprint | None, list[np.ndarray]]:
    """Read, check and measure one case; returns (problems, fingerprint, sampled foreground per channel)."""
    case, spec = args
    loaded = read_case(case, spec)
    if loaded.problems:
        return loaded.problems, None, []
    image, label, geometry = loaded.image, loaded.label, loaded.geometry
    box = bounding_box(nonzero_mask(image))
    image, label = crop(image, box), crop(label, box)
    foreground = label > 0
    if spec.ignore_label is not None:
        foreground &= label != spec.ignore_label
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    index = np.flatnonzero(foreground)
    if index.size > SAMPLES_PER_CASE:
        index = np.sort(rng.choice(index, SAMPLES_PER_CASE, replace=False))
    samples = [channel.ravel()[index] for channel in image]
    classes = {}
    for value in spec.label_values:
        if value == 0:
            continue
        mask = label == value
        voxels = int(mask.sum())
        components, count = ndimage.label(mask) if voxels else (None, 0)
        sizes = np.sort(np.bincount(components.ravel())[1:])[::-1] if count else np.zeros(0, int)
        classes[str(value)] = ClassStats(voxels, int(count), sizes[:MAX_COMPONENT_SIZES].tolist())
    fingerprint = CaseFingerprint(
        case_id=case.case_id,
        # Rounded as the JSON file rounds it, so a plan from the saved fingerprint is the same.
        spacing=[float(f"{s:.10g}") for s in geometry.array_spacing],
        shape_before_crop=list(geometry.array_shape),
        shape_after_crop=list(label.shape),
        crop_box=box,
        intensity=[IntensityStats.of(s) for s in samples],
        classes=classes,
    )
    return [], fingerprint, samples


def compute_fingerprint(dataset_dir: str | Path, num_processes: int = 2, progress: bool = True) -> DatasetFingerprint:
    """Check and fingerprint a raw dataset; raises ``DatasetCheckFailed`` with every problem."""
    spec = load_dataset_spec(dataset_dir)
    problems = dataset_level_problems(spec)
    labelled = [c for c in spec.cases if c.label is not None and c.images]
    unpaired = [c for c in spec.cases if c.label is None or not c.images]
    # Unpaired files are problems too; read_case words them.
    results = map_with_progress(fingerprint_case, [(c, spec) for c in labelled + unpaired], num_processes,
                                "fingerprint", progress)
    cases, samples = [], [[] for _ in spec.channel_names]
    for case_problems, case_fingerprint, case_samples in results:
        problems.extend(case_problems)
        if case_fingerprint is not None:
            cases.append(case_fingerprint)
            for channel, values in enumerate(case_samples):
                samples[channel].append(values)
    raise_if_problems(problems, dataset_dir)
    if not cases:
        raise DatasetError("no labelled case to fingerprint", dataset_dir)
    cases.sort(key=lambda c: c.case_id)
    spacings = np.array([c.spacing for c in cases])
    shapes = np.array([c.shape_after_crop for c in cases])
    relative = [np.prod(c.shape_after_crop) / np.prod(c.shape_before_crop) for c in cases]
    is_2d = all(c.shape_before_crop[0] == 1 for c in cases)
    pooled = [IntensityStats.of(np.concatenate(values)) for values in samples]
    return DatasetFingerprint(
        schema_version=FINGERPRINT_SCHEMA_VERSION,
        dataset_name=spec.name,
        channel_names=spec.channel_names,
        label_values=spec.label_values,
        is_2d=is_2d,
        cases=cases,
        foreground_intensity=pooled,
        median_spacing=[float(v) for v in np.median(spacings, axis=0)],
        median_shape_after_crop=[int(round(v)) for v in np.median(shapes, axis=0)],
        median_relative_size_after_crop=float(np.median(relative)),
        max_anisotropy=float(max(c.anisotropy for c in cases)),
    )


def save_fingerprint(fingerprint: DatasetFingerprint, path: str | Path) -> None:
    save_json(fingerprint, path)


def load_fingerprint(path: str | Path) -> DatasetFingerprint:
    return load_record(DatasetFingerprint, path, DatasetError, FINGERPRINT_SCHEMA_VERSION)
