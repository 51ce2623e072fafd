"""What a report is made of: for every case its image, reference, prediction and evaluated metrics.

Two ways in, one record out (``ReportSources``):

* a folder of predictions against a folder of references (after ``autoseg evaluate``);
* the validation of trained folds (``fold_N/validation``, written at the end of training),
  with the raw dataset's images and labels and each fold's ``progress.png``.

Per-case metrics are never recomputed differently: they are the rows of ``autoseg
evaluate``'s ``summary.json`` when one describes exactly these files, and otherwise
``evaluate_folder`` is run (its ``summary.json`` and ``per_case.csv`` then go into the
report folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.dataset.spec import DatasetSpec, load_dataset_spec
from autoseg.errors import DatasetError, UsageError
from autoseg.evaluation.evaluate import EvaluationSummary, evaluate_folder, evaluation_classes, pair_label_files
from autoseg.io.dicom_seg import SEG_ENDING
from autoseg.io.images import SUPPORTED_ENDINGS
from autoseg.paths import Roots
from autoseg.planning.plans import Plans, load_plans
from autoseg.records import load_record
from autoseg.report.window import WindowRule, ct_window


@dataclass
class CaseSource:
    case_id: str
    image_files: list[str]  # the case's channel files, in order
    reference_file: str
    prediction_file: str
    metrics: dict[str, Any]  # the evaluation row: "CLASS/METRIC" -> value, None where undefined
    fold: str | None = None


@dataclass
class ReportSources:
    dataset_name: str
    title: str
    labels: dict[str, Any]
    channel: int | None
    channel_name: str
    cases: list[CaseSource]
    metrics_from: list[str]  # the summary.json files the metrics were read from
    window_rule: WindowRule | None = None  # None: each image its own percentiles
    training_curves: dict[str, str] = field(default_factory=dict)  # fold -> progress.png

    @property
    def classes(self) -> dict[str, list[int]]:
        return evaluation_classes(self.labels)


def case_id_of(file_name: str, file_ending: str | None = None) -> str:
    endings = [file_ending] if file_ending else sorted(SUPPORTED_ENDINGS, key=len, reverse=True)
    for ending in endings:
        if file_name.lower().endswith(ending.lower()):
            return file_name[: -len(ending)]
    return file_name


def _check_channel(channel: int | None, spec: DatasetSpec) -> str:
    if not 0 <= (channel or 0) < len(spec.channel_names):
        raise UsageError(f"--channel {channel}: the dataset has {len(spec.channel_names)} channel(s) "
                         f"({', '.join(spec.channel_names)})")
    return spec.channel_names[channel or 0]


# ---- a folder of predictions -----------------------------------------------------------------------------

def image_folders(references: Path, spec: DatasetSpec, images: str | None) -> list[Path]:
    """Where the images of a references folder are: --images, else labelsXx's sibling imagesXx, else the dataset's."""
    if images:
        if not Path(images).is_dir():
            raise UsageError(f"--images {images}: not a folder")
        return [Path(images)]
    candidates = []
    if references.name.startswith("labels"):
        candidates.append(references.parent / ("images" + references.name[len("labels"):]))
    candidates += [Path(spec.root) / "imagesTr", Path(spec.root) / "imagesTs"]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


def find_images(case_id: str, folders: list[Path], file_ending: str) -> list[str]:
    """The case's channel files (``CASE_0000``, ``CASE_0001`` ... or a plain ``CASE``) in the first folder holding them."""
    for folder in folders:
        files = []
        while (folder / f"{case_id}_{len(files):04d}{file_ending}").is_file():
            files.append(str(folder / f"{case_id}_{len(files):04d}{file_ending}"))
        if not files and (folder / f"{case_id}{file_ending}").is_file():
            files = [str(folder / f"{case_id}{file_ending}")]
        if files:
            return files
    return []


def _matching_summary(references: Path, predictions: Path, pairs: list[tuple[str, str]], classes: list[str]
                      ) -> EvaluationSummary | None:
    """``predictions/summary.json`` if it was computed for exactly these files and is newer than all of them."""
    file = predictions / "summary.json"
    if not file.is_file():
        return None
    summary = load_record(EvaluationSummary, file, DatasetError)
    written = file.stat().st_mtime
    rows = {row.get("case") for row in summary.per_case}
    same_folders = (Path(summary.reference_dir).resolve() == references.resolve()
                    and Path(summary.prediction_dir).resolve() == predictions.resolve())
    has_classes = all(f"{c}/dice" in row and f"{c}/hd95" in row for c in classes for row in summary.per_case)
    fresh = all(max((references / r).stat().st_mtime, (predictions / p).stat().st_mtime) <= written for r, p in pairs)
    return summary if same_folders and rows == {r for r, _ in pairs} and has_classes and fresh else None


def folder_sources(references: str | Path, predictions: str | Path, spec: DatasetSpec, channel: int,
                   images: str | None, plans: Plans | None, fingerprint_file: Path | None, scratch: Path,
                   num_processes: int) -> ReportSources:
    references, predictions = Path(references), Path(predictions)
    for folder in (references, predictions):
        if not folder.is_dir():
            raise UsageError("is not a folder", folder)
    channel_name = _check_channel(channel, spec)
    ending = spec.file_ending
    pairs = pair_label_files(references, predictions, ending)  # label maps or DICOM SEGs, paired by case
    prediction_of = dict(pairs)
    names = [r for r, _ in pairs]
    missing = [n for n in names if not (predictions / prediction_of[n]).is_file()]
    if missing:
        raise DatasetError(f"no prediction for {len(missing)} reference(s): {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}", predictions)
    folders = image_folders(references, spec, images)
    image_files = {n: find_images(case_id_of(n, _ending_of(n, ending)), folders, ending) for n in names}
    lost = [case_id_of(n, _ending_of(n, ending)) for n, f in image_files.items() if not f]
    if lost:
        looked = ", ".join(str(f) for f in folders) or "no image folder found"
        raise DatasetError(f"no image for {len(lost)} case(s): {', '.join(lost[:5])}"
                           f"{' ...' if len(lost) > 5 else ''} (looked in {looked}; give --images FOLDER)", references)
    classes = list(evaluation_classes(spec.labels))
    summary = _matching_summary(references, predictions, pairs, classes)
    if summary is not None:
        metrics_from = str(predictions / "summary.json")
    else:  # evaluate_folder itself: the same metrics as `autoseg evaluate`, saved beside the report
        summary = evaluate_folder(references, predictions, spec.labels, ending, 1.0, num_processes, scratch,
                                  progress=False)
        metrics_from = "summary.json of this report (evaluated now: no up-to-date summary.json beside the predictions)"
    rows = {row["case"]: row for row in summary.per_case}
    cases = [CaseSource(case_id_of(n, _ending_of(n, ending)), image_files[n], str(references / n),
                        str(predictions / prediction_of[n]), rows[n]) for n in names]
    return ReportSources(spec.name, f"{predictions.name} against {references.name}", spec.labels, channel,
                         channel_name, cases, [metrics_from], ct_window(channel or 0, channel_name, plans, fingerprint_file))


def _ending_of(name: str, file_ending: str) -> str:
    return SEG_ENDING if name.endswith(SEG_ENDING) and not name.endswith(file_ending) else file_ending


# ---- the validation of trained folds ---------------------------------------------------------------------

def trained_folds(model_dir: Path) -> list[str]:
    """Every fold of a trained model that has a validation summary, in order."""
    folds = [p.name[len("fold_"):] for p in model_dir.glob("fold_*") if (p / "validation" / "summary.json").is_file()]
    return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def trained_sources(roots: Roots, dataset_name: str, configuration: str, architecture: str, folds: list[str] | None,
                    channel: int | None) -> ReportSources:
    model_dir = roots.training_output(dataset_name, configuration, architecture, 0).parent
    if not model_dir.is_dir():
        raise UsageError(f"no trained model {configuration}__{architecture} (train it first, or give -c/-a)", model_dir)
    folds = folds or trained_folds(model_dir)
    if not folds:
        raise UsageError("no fold has a validation/summary.json yet (training writes it when a fold ends)", model_dir)
    spec = load_dataset_spec(roots.raw_dataset(dataset_name))
    channel_name = _check_channel(channel, spec)
    by_id = {case.case_id: case for case in spec.cases}
    cases, metrics_from, curves = [], [], {}
    for fold in folds:
        fold_dir = model_dir / f"fold_{fold}"
        summary_file = fold_dir / "validation" / "summary.json"
        if not summary_file.is_file():
            raise UsageError(f"does not exist: fold {fold} was not trained or its training has not finished "
                             "(`autoseg train ... --continue` completes it)", summary_file)
        summary = load_record(EvaluationSummary, summary_file, DatasetError)
        lacking = sorted({c for c in evaluation_classes(spec.labels) for row in summary.per_case
                          if f"{c}/dice" not in row or f"{c}/hd95" not in row})
        if lacking or not all("case" in row for row in summary.per_case):
            raise DatasetError(f"per-case rows lack the case or class(es) {lacking} of dataset.json; re-evaluate "
                               "the fold (autoseg evaluate)", summary_file)
        metrics_from.append(str(summary_file))
        if (fold_dir / "progress.png").is_file():
            curves[fold] = str(fold_dir / "progress.png")
        for row in summary.per_case:
            case_id = case_id_of(row["case"])
            case = by_id.get(case_id)
            if case is None or case.label is None or not case.images:
                raise DatasetError(f"validation case {case_id} has no image and label in the raw dataset {spec.root}",
                                   summary_file)
            cases.append(CaseSource(case_id, case.images, case.label,
                                    str(fold_dir / "validation" / row["case"]), row, fold))
    plans_file = next((f for f in [model_dir / f"fold_{folds[0]}" / "plans.json", model_dir / "plans.json",
                                   roots.plans_file(dataset_name)] if f.is_file()), None)
    plans = load_plans(plans_file) if plans_file else None
    window = ct_window(channel or 0, channel_name, plans, roots.fingerprint_file(dataset_name))
    title = f"{configuration}__{architecture}, validation of fold{'s' if len(folds) > 1 else ''} {', '.join(folds)}"
    return ReportSources(dataset_name, title, spec.labels, channel, channel_name, cases, metrics_from, window, curves)
