"""Postprocessing: keep only the largest connected component, where cross-validation says it helps.

nnU-Net's rule, on the cross-validation predictions of a model (or an ensemble):

1. keep the largest connected component of all foreground together (every other
   component becomes background); kept if the mean Dice over the classes rises;
2. then, on top of step 1's outcome, per class (or region): keep that class's largest
   component; kept if that class's mean Dice rises.

Only a strict rise keeps a step, so a model whose predictions are already one blob each
is left alone. The decision is a ``PostprocessingDecision`` saved as
``postprocessing.json`` beside the model (or the ensemble) with the Dice before and
after; ``autoseg predict`` applies it to every label map it writes.

Components are found with full connectivity (26 neighbours in 3D, 8 in a 2D slice),
as nnU-Net does; Dice follows the evaluation's rules (both masks empty: 1; voxels under
the reference's ignore label count in neither mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.errors import AutosegError
from autoseg.evaluation.evaluate import evaluation_classes
from autoseg.evaluation.metrics import dice_score
from autoseg.io.images import read_label
from autoseg.parallel import map_with_progress
from autoseg.records import load_record, save_json

POSTPROCESSING_SCHEMA_VERSION = 1
POSTPROCESSING_FILE = "postprocessing.json"
FOREGROUND = "all foreground"


@dataclass
class PostprocessingStep:
    """One candidate step: what it would do and the Dice that decided it."""

    target: str  # "all foreground" or a class (region) name
    label_values: list[int]  # the label values whose union is the mask whose largest component is kept
    criterion: str  # what was compared: "mean Dice over classes" or "Dice of <class>"
    dice_without: float
    dice_with: float
    kept: bool


@dataclass
class PostprocessingDecision:
    schema_version: int
    # Applied in this order: the largest component of all foreground, then of each class listed.
    largest_foreground_component: bool
    largest_component_classes: dict[str, list[int]]  # class name -> label values (one, or a region's)
    mean_dice_before: float
    mean_dice_after: float
    dice_before: dict[str, float]  # per class, mean over cases
    dice_after: dict[str, float]
    num_cases: int
    source: str  # the predictions it was determined on
    steps: list[PostprocessingStep] = field(default_factory=list)

    @property
    def changes_anything(self) -> bool:
        return self.largest_foreground_component or bool(self.largest_component_classes)

    def describe(self) -> str:
        parts = (["largest foreground component"] if self.largest_foreground_component else []) + [
            f"largest {name} component" for name in self.largest_component_classes]
        return ", ".join(parts) if parts else "none"


def save_postprocessing(decision: PostprocessingDecision, folder: str | Path) -> Path:
    path = Path(folder) / POSTPROCESSING_FILE
    save_json(decision, path)
    return path


def load_postprocessing(folder: str | Path) -> PostprocessingDecision | None:
    """The decision saved in ``folder``, or None when there is none."""
    path = Path(folder) / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    return load_record(PostprocessingDecision, path, AutosegError, POSTPROCESSING_SCHEMA_VERSION)


def keep_largest_component(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``labels`` with every voxel of ``mask`` outside its largest connected component set to 0."""
    if not mask.any():
        return labels
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    result = labels.copy()
    result[mask & (components != int(sizes.argmax()))] = 0
    return result


def apply_postprocessing(labels: np.ndarray, decision: PostprocessingDecision | None) -> np.ndarray:
    """Apply a saved decision to a label map of original label values."""
    if decision is None:
        return labels
    if decision.largest_foreground_component:
        labels = keep_largest_component(labels, labels != 0)
    for values in decision.largest_component_classes.values():
        labels = keep_largest_component(labels, np.isin(labels, values))
    return labels


# ---- determining the decision on cross-validation predictions ------------------------------------------------

@dataclass
class ScoredCase:
    """One cross-validation case: its reference and its prediction, as a label map or as
    probability files (``.npz``) whose average is the prediction of an ensemble."""

    case_id: str
    reference: Path
    prediction: Path | None = None
    probabilities: list[Path] = field(default_factory=list)

    def load_prediction(self) -> np.ndarray:
        if self.prediction is not None:
            return read_label(self.prediction)[0]
        from autoseg.inference.ensemble import labels_from_probability_files

        return labels_from_probability_files(self.probabilities)


def _class_dice(reference: np.ndarray, labels: np.ndarray, values: list[int], valid: np.ndarray | None) -> float:
    ref, pred = np.isin(reference, values), np.isin(labels, values)
    if valid is not None:
        ref &= valid
        pred &= valid
    return dice_score(ref, pred)


def _score_case(job: tuple[ScoredCase, dict[str, list[int]], int | None, PostprocessingDecision | None]
                ) -> dict[str, float]:
    """Dice per class of every variant the decision needs, for one case.

    Without ``final``: the raw prediction ("none/C"), the foreground step ("fg/C"), and each
    class step on top of either ("none+C", "fg+C": only class C's Dice, the only one it can
    change for plain labels). With ``final``: that decision's Dice per class.
    """
    case, classes, ignore, final = job
    reference, geometry = read_label(case.reference)
    labels = case.load_prediction()
    if list(labels.shape) != list(reference.shape):
        raise AutosegError(f"prediction of shape {list(labels.shape)} does not match its reference "
                           f"{list(reference.shape)}", case.reference)
    valid = reference != ignore if ignore is not None else None
    scores: dict[str, float] = {}
    if final is not None:
        processed = apply_postprocessing(labels, final)
        return {name: _class_dice(reference, processed, values, valid) for name, values in classes.items()}
    variants = {"none": labels, "fg": keep_largest_component(labels, labels != 0)}
    for base, variant in variants.items():
        for name, values in classes.items():
            scores[f"{base}/{name}"] = _class_dice(reference, variant, values, valid)
            processed = keep_largest_component(variant, np.isin(variant, values))
            scores[f"{base}+{name}"] = _class_dice(reference, processed, values, valid)
    return scores


def determine_postprocessing(cases: list[ScoredCase], labels: dict[str, Any], source: str,
                             num_processes: int = 2, progress: bool = True) -> PostprocessingDecision:
    """Choose the steps that raise Dice on ``cases`` (cross-validation predictions)."""
    if not cases:
        raise AutosegError("no cross-validation predictions to determine postprocessing on", source)
    classes = evaluation_classes(labels)
    ignore = labels.get("ignore")
    rows = map_with_progress(_score_case, [(c, classes, ignore, None) for c in cases], num_processes,
                             "postprocessing", progress)
    mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    names = list(classes)
    before = {name: mean[f"none/{name}"] for name in names}
    with_foreground = {name: mean[f"fg/{name}"] for name in names}
    steps = []
    use_foreground = _class_mean(with_foreground) > _class_mean(before)
    steps.append(PostprocessingStep(FOREGROUND, sorted({v for vs in classes.values() for v in vs}),
                                    "mean Dice over classes", _class_mean(before), _class_mean(with_foreground),
                                    use_foreground))
    base = "fg" if use_foreground else "none"
    after = dict(with_foreground if use_foreground else before)
    kept_classes: dict[str, list[int]] = {}
    for name in names:
        without, with_step = mean[f"{base}/{name}"], mean[f"{base}+{name}"]
        kept = with_step > without
        steps.append(PostprocessingStep(name, list(classes[name]), f"Dice of {name}", without, with_step, kept))
        if kept:
            kept_classes[name] = list(classes[name])
            after[name] = with_step
    decision = PostprocessingDecision(POSTPROCESSING_SCHEMA_VERSION, use_foreground, kept_classes,
                                      _class_mean(before), _class_mean(after), before, after, len(cases), source, steps)
    if kept_classes and any(len(values) > 1 for values in classes.values()):
        # Regions share label values, so one class's step can change another's Dice:
        # measure the combined decision instead of adding up the steps.
        rows = map_with_progress(_score_case, [(c, classes, ignore, decision) for c in cases], num_processes,
                                 "postprocessing", progress)
        decision.dice_after = {name: float(np.mean([row[name] for row in rows])) for name in names}
        decision.mean_dice_after = _class_mean(decision.dice_after)
    return decision


def _class_mean(per_class: dict[str, float]) -> float:
    return float(np.mean(list(per_class.values())))
