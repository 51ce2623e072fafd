"""The end of a fold: its validation cases predicted from the raw images and evaluated.

Uses the one predictor (sliding window, mirroring, original geometry) and the one
evaluation, so these numbers are what ``autoseg predict`` + ``autoseg evaluate`` give.
With ``save_probabilities`` each case's class probabilities are kept (``CASE.npz``) so
that ``find-best`` can try ensembles. Once every fold of ``splits.json`` is validated,
the postprocessing is determined on all of them and saved beside the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from autoseg.dataset.spec import load_dataset_spec
from autoseg.errors import AutosegError, UsageError
from autoseg.evaluation.evaluate import evaluate_folder, format_table
from autoseg.inference.ensemble import save_probability_file
from autoseg.inference.model import load_trained_model
from autoseg.inference.predictor import PredictionSettings, predict_case
from autoseg.io.images import read_image, read_label, write_label
from autoseg.paths import Roots
from autoseg.preprocessing.store import list_finished_cases, load_properties
from autoseg.records import read_json


def validate_fold(roots: Roots, dataset_name: str, configuration: str, architecture: str, fold: str,
                  val_ids: list[str], device: torch.device, save_probabilities: bool = False) -> Path:
    model_dir = roots.training_output(dataset_name, configuration, architecture, fold).parent
    model = load_trained_model(model_dir, [str(fold)], configuration, architecture, device)
    plans = model.plans
    data_folder = roots.preprocessed_dataset(dataset_name) / plans.configuration(configuration).data_identifier
    out = model_dir / f"fold_{fold}" / "validation"
    (out / "summary.json").unlink(missing_ok=True)  # written last: its presence marks a finished validation
    ending = ".nii.gz"
    if out.is_dir():  # an earlier validation's files: of cases the split no longer holds, or of an older model
        for stale in out.iterdir():
            if stale.is_file() and (stale.name.endswith(ending) or stale.suffix == ".npz"):
                stale.unlink()
    references = out / "references"
    shutil.rmtree(references, ignore_errors=True)  # left by a validation that was stopped
    references.mkdir(parents=True)
    settings = PredictionSettings(save_probabilities=save_probabilities)
    for case_id in val_ids:
        properties = load_properties(data_folder, case_id)
        arrays = [read_image(f)[0] for f in properties.source_images]
        image = torch.cat([torch.from_numpy(a) for a in arrays]).numpy()
        prediction = predict_case(model, image, properties.original_geometry, settings, device)
        reference_file = properties.source_images[0]
        if save_probabilities:
            save_probability_file(out / f"{case_id}.npz", prediction.probabilities, prediction.label_values,
                                  prediction.regions)
        largest = max(prediction.label_values)
        write_label(prediction.labels, out / f"{case_id}{ending}", properties.original_geometry, reference_file,
                    largest_label=largest)
        label, geometry = read_label(properties.source_label)
        write_label(label, references / f"{case_id}{ending}", geometry, reference_file, largest_label=largest)
    spec = load_dataset_spec(roots.preprocessed_dataset(dataset_name), with_cases=False)
    summary = evaluate_folder(references, out, spec.labels, ending, num_processes=1, output_dir=out, progress=False)
    print(f"validation of fold {fold} ({len(val_ids)} cases):\n{format_table(summary)}", flush=True)
    shutil.rmtree(references)
    _postprocessing_when_complete(roots, dataset_name, model_dir, spec.labels)
    return out


def _postprocessing_when_complete(roots: Roots, dataset_name: str, model_dir: Path, labels: dict) -> None:
    """Once every fold of splits.json has its validation, choose the postprocessing on all of them."""
    from autoseg.evaluation.crossval import validated_folds, validation_cases
    from autoseg.inference.postprocessing import determine_postprocessing, save_postprocessing

    splits_file = roots.preprocessed_dataset(dataset_name) / "splits.json"
    expected = [str(i) for i in range(len(read_json(splits_file)))] if splits_file.is_file() else []
    if not expected or not set(expected) <= set(validated_folds(model_dir)):
        return
    try:
        cases = list(validation_cases(roots, dataset_name, model_dir, expected).values())
        decision = determine_postprocessing(cases, labels, f"{model_dir.name}, folds {' '.join(expected)}",
                                            num_processes=1, progress=False)
    except AutosegError as exc:  # the fold itself is done and valid; say why, and go on
        print(f"postprocessing not determined ({exc.one_line()}); `autoseg find-best` will try again", flush=True)
        return
    path = save_postprocessing(decision, model_dir)
    print(f"postprocessing (cross-validation of {len(expected)} folds, {decision.num_cases} cases): "
          f"{decision.describe()}; mean Dice {decision.mean_dice_before:.4f} -> {decision.mean_dice_after:.4f} "
          f"-> {path}", flush=True)


def validate_trained_fold(roots: Roots, dataset_name: str, configuration: str, fold: str, architecture: str | None,
                          device: torch.device, save_probabilities: bool = False) -> Path:
    """Validate a fold that is already trained (``autoseg train ... --validation-only``)."""
    from autoseg.planning.plans import load_plans
    from autoseg.training.splits import cases_for_fold, load_or_create_splits

    plans = load_plans(roots.plans_file(dataset_name))
    arch = plans.architecture(configuration, architecture)
    splits_file = roots.preprocessed_dataset(dataset_name) / "splits.json"
    if not splits_file.is_file():
        raise UsageError("no splits.json: this dataset has no trained folds to validate", splits_file)
    data_folder = roots.preprocessed_dataset(dataset_name) / plans.configuration(configuration).data_identifier
    case_ids = list_finished_cases(data_folder)
    if fold == "all":
        raise UsageError("fold 'all' has no held-out cases to validate; give a fold number")
    _, val_ids = cases_for_fold(load_or_create_splits(splits_file, case_ids), fold, case_ids)
    return validate_fold(roots, dataset_name, configuration, arch.name, fold, val_ids, device, save_probabilities)
