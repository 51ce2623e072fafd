"""The predictor: one image in, one label map out, in the image's own geometry.

Used by ``autoseg predict``, by the end-of-training validation and by ``find-best``:
preprocess exactly as the plan says, sliding window with mirroring over the folds,
resample the probabilities back to the cropped original grid, un-crop, argmax, and give
each voxel its original label value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autoseg.inference.model import TrainedModel
from autoseg.inference.sliding_window import predict_probabilities
from autoseg.io.images import Geometry
from autoseg.planning.plans import Plans
from autoseg.preprocessing.crop import uncrop
from autoseg.preprocessing.preprocess import class_values, preprocess_arrays
from autoseg.preprocessing.resample import resample_probabilities


@dataclass
class PredictionSettings:
    step: float = 0.5
    mirror: bool = True
    windows_per_batch: int = 4
    amp: bool = True  # bf16 autocast on CUDA; the CPU always computes in fp32
    save_probabilities: bool = False


@dataclass
class CasePrediction:
    labels: np.ndarray  # (Z, Y, X) original label values, original grid
    probabilities: np.ndarray | None  # (K, Z, Y, X) float16, original grid, when asked for


def predict_case(model: TrainedModel, image: np.ndarray, geometry: Geometry, settings: PredictionSettings,
                 device: torch.device) -> CasePrediction:
    plans = model.plans
    config = plans.configuration(model.configuration)
    arch = plans.architecture(model.configuration, model.architecture)
    pre = preprocess_arrays(image, None, geometry, plans, model.configuration)
    amp_dtype = torch.bfloat16 if settings.amp and device.type == "cuda" else None
    probabilities = predict_probabilities(
        model.networks, torch.from_numpy(pre.image).to(device), arch.patch_size, settings.step,
        settings.mirror, settings.windows_per_batch, amp_dtype, sigmoid=plans.has_regions)
    probabilities = probabilities.cpu().numpy()
    probabilities = resample_probabilities(probabilities, pre.shape_after_crop, config.anisotropic_axis)
    labels = uncrop(probabilities_to_labels(probabilities, plans), pre.crop_box, geometry.array_shape, fill=0)
    full = None
    if settings.save_probabilities:
        full = uncrop(probabilities.astype(np.float16), pre.crop_box, geometry.array_shape, fill=0)
        if not plans.has_regions:
            full[0][_outside(pre.crop_box, geometry.array_shape)] = 1.0  # background outside the crop
    return CasePrediction(labels, full)


def probabilities_to_labels(probabilities: np.ndarray, plans: Plans) -> np.ndarray:
    """Label values from class probabilities (argmax), or from region probabilities as nnU-Net
    does: each region above 0.5 writes its value of ``regions_class_order``, in that order, so
    a nested region drawn later (say, enhancing tumour) overwrites the one containing it."""
    if not plans.has_regions:
        values = np.asarray(class_values(plans), dtype=np.int16)
        return values[probabilities.argmax(0)]
    labels = np.zeros(probabilities.shape[1:], dtype=np.int16)
    for region_probability, value in zip(probabilities, plans.regions_class_order):
        labels[region_probability > 0.5] = value
    return labels


def _outside(box: list[list[int]], shape: list[int]) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    return ~inside
