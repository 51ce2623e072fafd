"""The end of a fold: its validation cases predicted from the raw images and evaluated.

Uses the one predictor (sliding window, mirroring, original geometry) and the one
evaluation, so these numbers are what ``autoseg predict`` + ``autoseg evaluate`` give.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from autoseg.dataset.spec import load_dataset_spec
from autoseg.evaluation.evaluate import evaluate_folder, format_table
from autoseg.inference.model import load_trained_model
from autoseg.inference.predictor import PredictionSettings, predict_case
from autoseg.io.images import read_image, read_label, write_label
from autoseg.paths import Roots
from autoseg.preprocessing.store import load_properties


def validate_fold(roots: Roots, dataset_name: str, configuration: str, architecture: str, fold: str,
                  val_ids: list[str], device: torch.device) -> Path:
    model_dir = roots.training_output(dataset_name, configuration, architecture, fold).parent
    model = load_trained_model(model_dir, [str(fold)], configuration, architecture, device)
    plans = model.plans
    data_folder = roots.preprocessed_dataset(dataset_name) / plans.configuration(configuration).data_identifier
    out = model_dir / f"fold_{fold}" / "validation"
    references = out / "references"
    references.mkdir(parents=True, exist_ok=True)
    ending = ".nii.gz"
    for case_id in val_ids:
        properties = load_properties(data_folder, case_id)
        arrays = [read_image(f)[0] for f in properties.source_images]
        image = torch.cat([torch.from_numpy(a) for a in arrays]).numpy()
        prediction = predict_case(model, image, properties.original_geometry, PredictionSettings(), device)
        reference_file = properties.source_images[0]
        write_label(prediction.labels, out / f"{case_id}{ending}", properties.original_geometry, reference_file)
        label, geometry = read_label(properties.source_label)
        write_label(label, references / f"{case_id}{ending}", geometry, reference_file)
    spec = load_dataset_spec(roots.preprocessed_dataset(dataset_name), with_cases=False)
    summary = evaluate_folder(references, out, spec.labels, ending, num_processes=1, output_dir=out, progress=False)
    print(f"validation of fold {fold} ({len(val_ids)} cases):\n{format_table(summary)}", flush=True)
    shutil.rmtree(references)
    return out
