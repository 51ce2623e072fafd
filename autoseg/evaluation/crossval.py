"""A model's cross-validation results: the validation predictions of its folds, with their references.

Each trained fold's validation (``fold_N/validation/``, written at the end of training)
holds one label map per validation case, ``summary.json``, and with
``--save-probabilities`` one ``CASE.npz`` per case. The references are the raw label
files the preprocessed cases were made from (their ``CASE.json`` names them).
"""

from __future__ import annotations

from pathlib import Path

from autoseg.errors import AutosegError
from autoseg.inference.model import model_plans
from autoseg.inference.postprocessing import ScoredCase
from autoseg.paths import Roots
from autoseg.preprocessing.store import load_properties
from autoseg.records import read_json

VALIDATION_ENDING = ".nii.gz"  # what the end-of-training validation writes


def validation_folder(model_dir: Path, fold: str) -> Path:
    return model_dir / f"fold_{fold}" / "validation"


def validated_folds(model_dir: Path) -> list[str]:
    """Folds of ``model_dir`` whose validation finished (its ``summary.json`` is written last)."""
    if not model_dir.is_dir():
        return []
    folds = [p.name[len("fold_"):] for p in model_dir.glob("fold_*") if (p / "validation" / "summary.json").is_file()]
    return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def validation_cases(roots: Roots, dataset_name: str, model_dir: Path, folds: list[str],
                     probabilities: bool = False) -> dict[str, ScoredCase]:
    """case id -> its reference and validation prediction (label map, or ``.npz`` with ``probabilities``)."""
    configuration = model_dir.name.partition("__")[0]
    plans = model_plans(model_dir, [model_dir / f"fold_{f}" for f in folds], roots.plans_file(dataset_name))
    data_folder = roots.preprocessed_dataset(dataset_name) / plans.configuration(configuration).data_identifier
    cases: dict[str, ScoredCase] = {}
    for fold in folds:
        folder = validation_folder(model_dir, fold)
        summary = read_json(folder / "summary.json")
        for row in summary.get("per_case", []):
            case_id = str(row["case"])[: -len(VALIDATION_ENDING)]
            label_file = folder / f"{case_id}{VALIDATION_ENDING}"
            npz = folder / f"{case_id}.npz"
            if probabilities and not npz.is_file():
                raise AutosegError(f"no probabilities for {case_id} (train with --save-probabilities, or "
                                   f"`autoseg train ... --validation-only --save-probabilities`)", folder)
            source = load_properties(data_folder, case_id).source_label
            if source is None or not Path(source).is_file():
                raise AutosegError(f"the reference label of {case_id} is missing ({source})", folder)
            cases[case_id] = ScoredCase(case_id, Path(source), None if probabilities else label_file,
                                        [npz] if probabilities else [])
    return cases


def has_probabilities(model_dir: Path, folds: list[str]) -> bool:
    """Whether every validation case of ``folds`` has its ``.npz`` (what ensembling needs)."""
    for fold in folds:
        folder = validation_folder(model_dir, fold)
        rows = read_json(folder / "summary.json").get("per_case", [])
        if not rows or not all((folder / f"{str(r['case'])[: -len(VALIDATION_ENDING)]}.npz").is_file() for r in rows):
            return False
    return True
