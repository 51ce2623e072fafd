"""The integrity check: every problem of a raw dataset, one line each, before anything is written.

``read_case`` is the one place a training case is read: it returns the problems found
together with the arrays, so the fingerprint reads each file once and checks it on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.dataset.spec import CaseFiles, DatasetSpec, load_dataset_spec
from autoseg.errors import DatasetCheckFailed, ImageReadError
from autoseg.io.images import Geometry, intensity_problem, read_header, read_image, read_label
from autoseg.parallel import map_with_progress


@dataclass
class LoadedCase:
    case_id: str
    problems: list[str]
    image: np.ndarray | None = None  # (C, Z, Y, X) float32
    label: np.ndarray | None = None  # (Z, Y, X) int16, original label values
    geometry: Geometry | None = None


def _channel_numbers(case: CaseFiles, ending: str) -> list[int] | None:
    """The _NNNN numbers of the case's image files, sorted; None where the names do not carry them
    (a dataset.json that lists its files)."""
    numbers = []
    for file in case.images:
        stem = Path(file).name[: -len(ending)] if Path(file).name.endswith(ending) else ""
        if not (stem.startswith(f"{case.case_id}_") and stem[len(case.case_id) + 1:].isdigit()):
            return None
        numbers.append(int(stem[len(case.case_id) + 1:]))
    return sorted(numbers)


def read_case(case: CaseFiles, spec: DatasetSpec, need_label: bool = True, load: bool = True) -> LoadedCase:
    """Read and check one case; a problem never raises, it is recorded and reading goes on."""
    problems: list[str] = []
    result = LoadedCase(case.case_id, problems)
    if not case.images:
        problems.append(f"{case.label}: label has no image (no {case.case_id}_0000{spec.file_ending} in imagesTr)")
        return result
    if need_label and case.label is None:
        problems.append(f"{case.images[0]}: image has no label (expected labelsTr/{case.case_id}{spec.file_ending})")
    numbers = None if spec.listed_cases else _channel_numbers(case, spec.file_ending)
    if numbers is not None and numbers != list(range(len(numbers))):
        missing = min(set(range(len(numbers))) - set(numbers))
        problems.append(f"{case.images[0]}: case {case.case_id} has channel files "
                        f"{', '.join(f'_{n:04d}' for n in numbers)}: _{missing:04d} is missing (channels must be "
                        f"numbered from _0000 without gaps, or a later file would take its place)")
    channels, geometries = [], []
    for file in case.images:
        try:
            geometry, components = read_header(file)
        except ImageReadError as exc:
            problems.append(exc.one_line())
            continue
        geometries.append((file, geometry, components))
    components = sum(c for _, _, c in geometries)
    if len(geometries) == len(case.images) and components != len(spec.channel_names):
        problems.append(f"{case.images[0]}: case {case.case_id} has {components} channel(s), dataset.json names "
                        f"{len(spec.channel_names)} (files {', '.join(Path(f).name for f in case.images)})")
    label_geometry = None
    if case.label is not None:
        try:
            label_geometry, label_components = read_header(case.label)
            if label_components != 1:
                problems.append(f"{case.label}: label map has {label_components} components; expected one")
        except ImageReadError as exc:
            problems.append(exc.one_line())
    reference = label_geometry or (geometries[0][1] if geometries else None)
    for file, geometry, _ in geometries:
        if reference is not None and geometry is not reference:
            for difference in geometry.matches(reference):
                other = "label" if label_geometry is not None else Path(geometries[0][0]).name
                problems.append(f"{file}: {difference} of the {other}")
    if problems or not load:
        return result
    for file, _, _ in geometries:
        try:
            array, _ = read_image(file)
        except ImageReadError as exc:
            problems.append(exc.one_line())
            continue
        problem = intensity_problem(array)
        if problem:
            problems.append(f"{file}: {problem}")
        channels.append(array)
    if case.label is not None:
        try:
            result.label, _ = read_label(case.label)
        except ImageReadError as exc:
            problems.append(exc.one_line())
        else:
            unknown = np.setdiff1d(np.unique(result.label), spec.label_values)
            if unknown.size:
                problems.append(f"{case.label}: label values {unknown.tolist()} are not in dataset.json "
                                f"(allowed: {spec.label_values})")
    if not problems:
        result.image = np.concatenate(channels, axis=0) if len(channels) > 1 else channels[0]
        result.geometry = reference
    return result


def _check_one(args) -> list[str]:
    case, spec = args
    return read_case(case, spec).problems


def check_dataset(dataset_dir: str | Path, num_processes: int = 2, progress: bool = True) -> list[str]:
    """All problems of the dataset, one line each; an empty list means it is fine."""
    spec = load_dataset_spec(dataset_dir)
    problems = dataset_level_problems(spec)
    results = map_with_progress(_check_one, [(case, spec) for case in spec.cases], num_processes,
                                "check", progress)
    for case_problems in results:
        problems.extend(case_problems)
    return problems


def dataset_level_problems(spec: DatasetSpec) -> list[str]:
    json_path = Path(spec.root) / "dataset.json"
    problems = []
    if not spec.cases:
        problems.append(f"{Path(spec.root) / 'imagesTr'}: no file matches CASE_XXXX{spec.file_ending} "
                        "(check 'file_ending' in dataset.json)")
    labelled = sum(1 for c in spec.cases if c.label is not None and c.images)
    if spec.num_training and labelled != spec.num_training:
        problems.append(f"{json_path}: numTraining is {spec.num_training} but {labelled} labelled case(s) were found")
    return problems


def raise_if_problems(problems: list[str], dataset_dir: str | Path) -> None:
    if problems:
        raise DatasetCheckFailed(problems, dataset_dir)
