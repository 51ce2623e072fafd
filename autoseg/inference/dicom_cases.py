"""DICOM input and DICOM SEG output for folder prediction (``folder.py`` stays format-agnostic).

A folder whose cases are DICOM series (no image files at its top level, DICOM files below)
is listed through ``autoseg/io/dicom.py``; every case then carries its series, and its label
map can also be written as a DICOM SEG referencing the first channel's series.
"""

from __future__ import annotations

import sys
from pathlib import Path

from autoseg.errors import UsageError
from autoseg.io.images import label_file_ending

OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")


def list_dicom_input(input_dir: Path, num_channels: int, channel_patterns: list[str] | None):
    """(InputCase list, refused series lines) for a DICOM folder; None for a folder of image files."""
    from autoseg.inference.folder import InputCase, _ending
    from autoseg.io.dicom import dicom_cases, is_dicom_folder

    if not input_dir.is_dir() or any(_ending(p.name) for p in input_dir.iterdir() if not p.name.startswith(".")):
        if channel_patterns:
            raise UsageError("--dicom-channels is for folders of DICOM series; this one holds image files", input_dir)
        return None
    if not is_dicom_folder(input_dir):
        return None
    listing = dicom_cases(input_dir, num_channels, channel_patterns)
    refused = listing.refused_lines()
    for line in refused:
        print(f"autoseg: error: {line}; skipped", file=sys.stderr)
    if not listing.cases and not refused:
        raise UsageError("no DICOM image series in the input folder", input_dir)
    return [InputCase(c.case_id, c.channels[0].files, ".nii.gz", dicom=c) for c in listing.cases], refused


def output_files(case_id: str, ending: str, output_dir: Path, output_format: str,
                 probabilities: bool = False) -> list[Path]:
    """Every file a finished case has: a run that finds them all skips the case."""
    files = [] if output_format == "dicom-seg" else [output_dir / f"{case_id}{label_file_ending(ending)}"]
    files += [] if output_format == "nifti" else [output_dir / f"{case_id}.dcm"]
    return files + ([output_dir / f"{case_id}.npz"] if probabilities else [])


def seg_writer(model):
    """A function (labels, case, path) writing the SEG of one case predicted by ``model`` (or an ensemble)."""
    from autoseg.inference.ensemble import model_name
    from autoseg.io.dicom_seg import SegAlgorithm, check_segment_labels, segment_names, write_seg

    models = model if isinstance(model, list) else [model]
    algorithm = SegAlgorithm(models[0].plans.dataset_name, [model_name(m.configuration, m.architecture) for m in models],
                             list(models[0].folds))
    names = segment_names(models[0].plans)
    check_segment_labels(names)  # a model's class names, refused before any case is predicted
    return lambda labels, case, path: write_seg(labels, case.dicom.channels[0], names, algorithm, path)
