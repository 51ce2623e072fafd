"""The report's record, ``report.json``: every case worst first, with its figure, metrics and drawn slices."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoseg.evaluation.evaluate import ClassSummary

REPORT_SCHEMA_VERSION = 1
RECORD_NAME = "report.json"


@dataclass
class CaseEntry:
    case_id: str
    figure: str  # relative to the report folder
    image_file: str
    shown: str  # "channel N" or "RGB colour"
    reference_file: str
    prediction_file: str
    mean_dice: float  # over classes
    dice: dict[str, float]
    hd95: dict[str, float | None]  # mm; None where one mask is empty
    slice_index: list[int]  # the drawn slices, in the files' array order (Z, Y, X)
    slice_reason: str
    disagreement_voxels: int
    panels: list[str]  # what each drawn panel shows, e.g. "axial (Z = 7)" or "2D"
    window: list[float]
    window_source: str
    fold: str | None = None


@dataclass
class ReportRecord:
    schema_version: int
    dataset_name: str
    title: str
    channel: int | None  # None: the first channel, or colour where the file is RGB
    channel_name: str
    classes: list[str]
    metrics_from: list[str]
    per_class: dict[str, ClassSummary]
    cases: list[CaseEntry]  # worst first
    boxplots: str
    training_curves: dict[str, str] = field(default_factory=dict)  # fold -> figure, relative
    num_worst_shown: int = 10


def load_report(path) -> ReportRecord:
    from autoseg.errors import DatasetError
    from autoseg.records import load_record

    return load_record(ReportRecord, path, DatasetError, REPORT_SCHEMA_VERSION)
