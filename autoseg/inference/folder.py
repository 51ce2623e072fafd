"""Predicting a folder of images: case listing, read-ahead, resumable atomic output.

The next case is read and decoded in a background thread while the current one is
predicted. A case that cannot be read is reported (file and reason) and skipped; the
others are still predicted and the caller exits non-zero at the end. Each output is
written under a temporary name and renamed, and cases whose output exists are skipped
unless ``overwrite``, so an interrupted run continues where it stopped. ``part`` (K, N)
keeps the K-th of N contiguous slices of the sorted cases, so N jobs write every case once. A postprocessing
decision (``postprocessing.py``), when given, is applied to every label map written.
"""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoseg.errors import AutosegError, UsageError
from autoseg.inference.ensemble import save_probability_file
from autoseg.inference.model import TrainedModel
from autoseg.inference.postprocessing import PostprocessingDecision, apply_postprocessing
from autoseg.inference.predictor import PredictionSettings, check_ensemble, predict_case
from autoseg.io.images import SUPPORTED_ENDINGS, intensity_problem, label_file_ending, read_image
from autoseg.records import check_writable_folder

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    case_id: str
    files: list[Path]
    ending: str
    dicom: Any = None  # the case's DICOM series (autoseg.io.dicom.DicomCase) when the input is DICOM


@dataclass
class FolderResult:
    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line each: file and reason


def _ending(name: str) -> str | None:
    lower = name.lower()
    return next((e for e in sorted(SUPPORTED_ENDINGS, key=len, reverse=True) if lower.endswith(e)), None)


def list_input_cases(folder: Path, num_channels: int) -> list[InputCase]:
    """Cases by ``_XXXX`` channel suffix; a plain ``case.nii.gz`` is accepted for one-channel models."""
    if not folder.is_dir():
        raise UsageError("input folder does not exist", folder)
    grouped: dict[str, dict[int, Path]] = {}
    endings: dict[str, str] = {}
    unmatched: list[str] = []
    for path in sorted(folder.iterdir()):
        ending = _ending(path.name)
        if ending is None or path.name.startswith("."):
            continue
        stem = path.name[: -len(ending)]
        match = _CHANNEL.match(stem)
        case, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        if not match and num_channels != 1:
            unmatched.append(path.name)
            continue
        previous = grouped.setdefault(case, {}).get(channel)
        if previous is not None:  # a.nii.gz beside a.nrrd: which one the user meant is not ours to guess
            raise UsageError(f"two files for channel {channel} of case {case}: {previous.name} and {path.name}; "
                             "keep one", folder)
        grouped[case][channel] = path
        endings[case] = ending
    if unmatched:
        print(f"predict: {len(unmatched)} file(s) without a channel suffix (_0000 ...) passed over, the model "
              f"takes {num_channels} channels: {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}",
              file=sys.stderr)
    if not grouped:
        raise UsageError(f"no image files ({', '.join(SUPPORTED_ENDINGS)}) in the input folder", folder)
    cases = []
    for case, files in sorted(grouped.items()):
        if num_channels == 1 and 0 not in files:
            # liver_0001.nii.gz, liver_0002.nii.gz for a one-channel model: plain names that end in four
            # digits, not channels of a case "liver" (which would have a _0000)
            cases += [InputCase(path.name[: -len(_ending(path.name))], [path], _ending(path.name))
                      for path in files.values()]
        else:
            cases.append(InputCase(case, [files[c] for c in sorted(files)], endings[case]))
    return sorted(cases, key=lambda c: c.case_id)


def read_input_case(case: InputCase, num_channels: int):
    if case.dicom is not None:
        from autoseg.io.dicom import read_dicom_case

        return read_dicom_case(case.dicom, num_channels)
    plain = len(case.files) == 1 and case.files[0].name == f"{case.case_id}{case.ending}"  # liver_0001.nii.gz
    numbers = [0] if plain else [int(m["channel"]) if (m := _CHANNEL.match(f.name[: -len(case.ending)])) else 0
                                 for f in case.files]
    if numbers != list(range(len(numbers))):  # a missing _0000 must not let _0001 stand in for it
        raise AutosegError(f"case {case.case_id} has channel files {numbers}, expected 0..{len(numbers) - 1} "
                           f"({case.case_id}_0000{case.ending} ...)", case.files[0])
    arrays, geometry = [], None
    for file in case.files:
        array, geometry_of_file = read_image(file)
        if geometry is not None and geometry_of_file.matches(geometry):
            raise AutosegError(f"geometry differs from {case.files[0].name}: "
                               f"{'; '.join(geometry_of_file.matches(geometry))}", file)
        problem = intensity_problem(array)
        if problem:
            raise AutosegError(problem, file)
        geometry = geometry or geometry_of_file
        arrays.append(array)
    image = np.concatenate(arrays, axis=0)
    if image.shape[0] != num_channels:
        raise AutosegError(f"case {case.case_id} has {image.shape[0]} channel(s), the model expects {num_channels}",
                           case.files[0])
    return image, geometry


def select_part(cases: list[InputCase], part: tuple[int, int] | None) -> list[InputCase]:
    """The K-th (1-based) of N contiguous, nearly equal slices of ``cases`` (sorted by case id); all without ``part``."""
    if part is None:
        return cases
    number, count = part
    return cases[(number - 1) * len(cases) // count: number * len(cases) // count]


def predict_folder(model: TrainedModel | list[TrainedModel], input_dir: Path, output_dir: Path,
                   settings: PredictionSettings, device: torch.device, overwrite: bool = False, progress: bool = True,
                   postprocessing: PostprocessingDecision | None = None, part: tuple[int, int] | None = None,
                   output_format: str = "nifti", dicom_channels: list[str] | None = None) -> FolderResult:
    """Predict every case of ``input_dir`` with ``model`` (or the average of several) into ``output_dir``.

    ``input_dir`` may hold DICOM series instead of image files (``dicom_cases.py``); then
    ``output_format`` may also be ``dicom-seg`` or ``both``, and ``cases.csv`` names the series.
    ``part`` (K, N) keeps the K-th of N slices of the sorted cases (a job array's share).
    """
    from autoseg.inference.dicom_cases import list_dicom_input, output_files, seg_writer
    from autoseg.io.images import write_label

    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if input_dir == output_dir:
        raise UsageError("output folder must differ from the input folder (predictions would mix with images)",
                         output_dir)
    check_ensemble([model] if isinstance(model, TrainedModel) else model)  # once, before any case is read
    plans = (model if isinstance(model, TrainedModel) else model[0]).plans
    channels = plans.num_input_channels
    if output_format != "nifti" and plans.has_regions:
        # Its regions overlap (a tumour core inside the whole tumour): each would need a segment of its own
        # region's voxels, which the SEG writer does not make yet; a SEG of the label map would mislabel them.
        raise UsageError(f"--output-format {output_format}: DICOM SEG output of region-based models is not "
                         "supported yet; write label maps (--output-format nifti)")
    dicom = list_dicom_input(input_dir, channels, dicom_channels)
    if dicom is None and output_format != "nifti":
        raise UsageError(f"--output-format {output_format} needs DICOM series as input (a SEG references them)",
                         input_dir)
    cases, refused = dicom or (list_input_cases(input_dir, channels), [])
    check_writable_folder(output_dir)
    if dicom is not None:
        from autoseg.io.dicom import write_cases_csv

        # Every case, whichever part this is: the N jobs of --part share the output folder and write the
        # same listing (each only its own share overwrote the others').
        write_cases_csv([c.dicom for c in cases], output_dir / "cases.csv")
    cases = select_part(cases, part)
    # Series that cannot be read count as failures of part 1 only, so that one bad series fails one job, not N.
    result = FolderResult(failed=list(refused) if part is None or part[0] == 1 else [])
    write_seg = seg_writer(model) if output_format != "nifti" else None
    todo = []
    for case in cases:
        # With --save-probabilities the .npz counts too: the run that wrote the label map may not have asked.
        expected = output_files(case.case_id, case.ending, output_dir, output_format, settings.save_probabilities)
        if all(f.exists() for f in expected) and not overwrite:
            result.skipped_existing.append(case.case_id)
        else:
            todo.append(case)
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not (progress and sys.stderr.isatty()))
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read_input_case, todo[0], channels) if todo else None
        for index, case in enumerate(todo):
            current = pending
            pending = reader.submit(read_input_case, todo[index + 1], channels) if index + 1 < len(todo) else None
            try:
                image, geometry = current.result()
                prediction = predict_case(model, image, geometry, settings, device)
            except AutosegError as exc:  # this case only (unreadable, out of GPU memory): the others are predicted
                _case_failed(exc, case, result, bar)
                continue
            target = output_dir / f"{case.case_id}{label_file_ending(case.ending)}"
            if settings.save_probabilities:
                save_probability_file(output_dir / f"{case.case_id}.npz", prediction.probabilities,
                                      prediction.label_values, prediction.regions)
            labels = apply_postprocessing(prediction.labels, postprocessing)
            if output_format != "dicom-seg":
                write_label(labels, target, geometry, reference_file=case.files[0],
                            largest_label=max(prediction.label_values))
            if write_seg is not None:
                try:
                    write_seg(labels, case, output_dir / f"{case.case_id}.dcm")
                except AutosegError as exc:  # a series a SEG cannot reference (no frame of reference)
                    _case_failed(exc, case, result, bar)
                    continue
            result.written.append(case.case_id)
            bar.update()
    bar.close()
    return result


def _case_failed(exc: AutosegError, case, result: FolderResult, bar) -> None:
    """Count one case as failed, say why on stderr, and go on with the others."""
    failed = exc if exc.path else type(exc)(exc.problem, case.files[0])
    result.failed.append(failed.one_line())
    print(f"autoseg: error: {failed.one_line()}; skipped", file=sys.stderr)
    bar.update()
