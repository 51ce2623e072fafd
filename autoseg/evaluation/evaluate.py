"""Evaluating a folder of predictions against a folder of references.

Per case and per class (or region: a set of label values evaluated as one mask) Dice,
IoU, HD95 and NSD in mm (see ``metrics.py`` for definitions and the empty-mask rules);
per class mean and std over cases; ``summary.json``, ``per_case.csv`` and a table.
Voxels under the reference's ``ignore`` label are excluded from both masks. References and
predictions may be label maps or DICOM SEGs (``CASE.dcm``, segments named as in dataset.json);
a case is paired by its name, whatever the format on either side.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import DatasetError, UsageError
from autoseg.evaluation.metrics import pair_metrics
from autoseg.io.dicom_seg import SEG_ENDING, is_seg_file, read_any_label
from autoseg.io.images import label_file_ending
from autoseg.parallel import map_with_progress
from autoseg.records import atomic_write_bytes, check_writable_folder, save_json

METRICS = ("dice", "iou", "hd95", "nsd")
EMPTY_MASK_RULES = ("both masks empty: dice 1, iou 1, nsd 1, hd95 0; exactly one empty: dice 0, iou 0, nsd 0, "
                    "hd95 null (undefined; counted in n_undefined_hd95, left out of its mean)")


@dataclass
class ClassSummary:
    mean: dict[str, float | None]
    std: dict[str, float | None]
    n_undefined_hd95: int


@dataclass
class EvaluationSummary:
    reference_dir: str
    prediction_dir: str
    tolerance_mm: dict[str, float]
    empty_mask_rules: str
    per_class: dict[str, ClassSummary]
    mean_foreground: dict[str, float | None]
    per_case: list[dict[str, Any]] = field(default_factory=list)


def evaluation_classes(labels: dict[str, Any]) -> dict[str, list[int]]:
    """Classes to evaluate: every label except background and ignore; regions as their value sets."""
    return {name: (value if isinstance(value, list) else [value]) for name, value in labels.items()
            if name not in ("background", "ignore")}


def segment_values(classes: dict[str, list[int]]) -> dict[str, int]:
    """Class name -> label value, for reading DICOM SEG segments by their label (regions have no single value)."""
    return {name: values[0] for name, values in classes.items() if len(values) == 1}


def read_label_pair(reference_path, prediction_path, classes: dict[str, list[int]]):
    """(reference, its geometry, prediction, its geometry). A DICOM SEG is placed on the other file's grid: a
    SEG may omit its empty frames (most tools' default), so on its own it covers only the annotated slices.
    Where both are SEGs the prediction's grid serves (autoseg writes every frame)."""
    values = segment_values(classes)
    if is_seg_file(reference_path):
        prediction, pred_geometry = read_any_label(prediction_path, values)
        reference, ref_geometry = read_any_label(reference_path, values, pred_geometry)
    else:
        reference, ref_geometry = read_any_label(reference_path, values)
        prediction, pred_geometry = read_any_label(prediction_path, values,
                                                   ref_geometry if is_seg_file(prediction_path) else None)
    return reference, ref_geometry, prediction, pred_geometry


def evaluate_case(args) -> dict[str, Any]:
    reference_path, prediction_path, classes, tolerances, ignore = args
    reference, ref_geometry, prediction, pred_geometry = read_label_pair(reference_path, prediction_path, classes)
    problems = pred_geometry.matches(ref_geometry)
    if problems:
        raise DatasetError(f"does not match its reference {reference_path}: {'; '.join(problems)}", prediction_path)
    allowed = {0, *(v for values in classes.values() for v in values), *([] if ignore is None else [ignore])}
    for path, array in ((reference_path, reference), (prediction_path, prediction)):
        unknown = sorted(set(np.unique(array).tolist()) - allowed)
        if unknown:  # another dataset's labels, or a mislabelled file: its scores would mean nothing
            raise DatasetError(f"label values {unknown} are not in dataset.json (allowed: {sorted(allowed)})", path)
    valid = reference != ignore if ignore is not None else None
    spacing = ref_geometry.array_spacing
    row: dict[str, Any] = {"case": Path(reference_path).name}
    for name, values in classes.items():
        ref_mask, pred_mask = np.isin(reference, values), np.isin(prediction, values)
        if valid is not None:
            ref_mask &= valid
            pred_mask &= valid
        metrics = pair_metrics(ref_mask, pred_mask, spacing, tolerances[name])
        for metric in METRICS:
            row[f"{name}/{metric}"] = getattr(metrics, metric)
    return row


def evaluate_folder(reference_dir: str | Path, prediction_dir: str | Path, labels: dict[str, Any], file_ending: str,
                    tolerance_mm: float | dict[str, float] = 1.0, num_processes: int = 2,
                    output_dir: str | Path | None = None, progress: bool = True) -> EvaluationSummary:
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    classes = evaluation_classes(labels)
    unknown = sorted(set(tolerance_mm) - set(classes)) if isinstance(tolerance_mm, dict) else []
    if unknown:  # a misspelt class would silently keep the 1 mm default
        raise UsageError(f"NSD tolerance given for {', '.join(unknown)}, not classes of these labels "
                         f"({', '.join(classes)})")
    tolerances = {name: float(tolerance_mm[name] if isinstance(tolerance_mm, dict) and name in tolerance_mm
                              else tolerance_mm if not isinstance(tolerance_mm, dict) else 1.0) for name in classes}
    pairs = pair_label_files(reference_dir, prediction_dir, file_ending)
    if output_dir is not None:
        check_writable_folder(output_dir)
    ignore = labels.get("ignore")
    jobs = [(reference_dir / r, prediction_dir / p, classes, tolerances, ignore) for r, p in pairs]
    rows = map_with_progress(evaluate_case, jobs, num_processes, "evaluate", progress)
    per_class, mean_foreground = summarize_rows(rows, list(classes))
    summary = EvaluationSummary(str(reference_dir), str(prediction_dir), tolerances, EMPTY_MASK_RULES, per_class,
                                mean_foreground, [_json_row(r) for r in rows])
    if output_dir is not None:
        output_dir = Path(output_dir)
        save_json(summary, output_dir / "summary.json")
        atomic_write_bytes(output_dir / "per_case.csv", per_case_csv(rows).encode())
    return summary


def summarize_rows(rows: list[dict[str, Any]], classes: list[str]) -> tuple[dict[str, ClassSummary],
                                                                             dict[str, float | None]]:
    """Per-class mean and std over cases (undefined values, NaN or null, left out) and the mean over classes."""
    per_class = {}
    for name in classes:
        mean, std = {}, {}
        for metric in METRICS:
            values = np.array([row[f"{name}/{metric}"] for row in rows], dtype=float)  # None becomes NaN
            defined = values[~np.isnan(values)]
            mean[metric] = float(defined.mean()) if defined.size else None
            std[metric] = float(defined.std()) if defined.size else None
        undefined = int(np.isnan(np.array([row[f"{name}/hd95"] for row in rows], dtype=float)).sum())
        per_class[name] = ClassSummary(mean, std, undefined)
    mean_foreground = {}
    for metric in METRICS:
        means = [c.mean[metric] for c in per_class.values() if c.mean[metric] is not None]
        mean_foreground[metric] = float(np.mean(means)) if means else None
    return per_class, mean_foreground


def pair_label_files(reference_dir: Path, prediction_dir: Path, file_ending: str) -> list[tuple[str, str]]:
    """(reference, prediction) file names of each case, every reference paired or the unpaired ones named."""
    references, predictions = (_label_files(folder, file_ending) for folder in (reference_dir, prediction_dir))
    if not references:
        raise DatasetError(f"no reference files ending in {file_ending} (or DICOM SEGs, {SEG_ENDING})", reference_dir)
    for what, unpaired in (("no prediction for {} reference(s)", set(references) - set(predictions)),
                           (f"no reference in {reference_dir} for {{}} prediction(s)", set(predictions) - set(references))):
        if unpaired:
            names = sorted((references | predictions)[case] for case in unpaired)
            raise DatasetError(f"{what.format(len(unpaired))}: {', '.join(names[:5])}"
                               f"{' ...' if len(unpaired) > 5 else ''}", prediction_dir)
    return [(references[case], predictions[case]) for case in sorted(references)]


def _label_files(folder: Path, file_ending: str) -> dict[str, str]:
    """Case name -> file name; a label map wins over a DICOM SEG of the same case (``--output-format both``)."""
    if not folder.is_dir():
        raise DatasetError("folder does not exist", folder)
    files: dict[str, str] = {}
    # A JPEG dataset's predictions are PNG (autoseg predict writes label maps losslessly)
    for ending in dict.fromkeys((SEG_ENDING, label_file_ending(file_ending), file_ending)):
        files.update({p.name[: -len(ending)]: p.name for p in folder.iterdir()
                      if p.name.endswith(ending) and not p.name.startswith(".")})
    return files


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def per_case_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                             f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def format_table(summary: EvaluationSummary) -> str:
    def cell(c: ClassSummary, metric: str, digits: int) -> str:
        if c.mean[metric] is None:
            return "n/a"
        return f"{c.mean[metric]:.{digits}f} ± {c.std[metric]:.{digits}f}"

    header = f"{'class':16s} {'Dice':>15s} {'IoU':>15s} {'HD95 (mm)':>15s} {'NSD':>15s}"
    lines = [header, "-" * len(header)]
    for name, c in summary.per_class.items():
        lines.append(f"{name[:16]:16s} {cell(c, 'dice', 4):>15s} {cell(c, 'iou', 4):>15s} "
                     f"{cell(c, 'hd95', 2):>15s} {cell(c, 'nsd', 4):>15s}")
    m = summary.mean_foreground
    fmt = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines.append(f"{'mean':16s} {fmt(m['dice'], 4):>15s} {fmt(m['iou'], 4):>15s} {fmt(m['hd95'], 2):>15s} "
                 f"{fmt(m['nsd'], 4):>15s}")
    lines.append(f"{len(summary.per_case)} case(s); NSD tolerance {summary.tolerance_mm} mm")
    return "\n".join(lines)
