"""The predictor: one image in, one label map out, in the image's own geometry.

Used by ``autoseg predict``, by the end-of-training validation and by ``find-best``:
preprocess exactly as the plan says, sliding window with mirroring over the folds,
resample the probabilities back to the cropped original grid, un-crop, argmax, and give
each voxel its original label value. Several models (an ensemble of configurations or
architectures) are averaged on the original grid, each preprocessed as its own plan says.

Memory: the probabilities are resampled back one class at a time. With one model and no
``save_probabilities`` only a running maximum and argmax are kept on the original grid
(not the K-class volume), which is what lets a 512x512x400 CT predict on a laptop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from autoseg.errors import UsageError
from autoseg.inference.ensemble import argmax_labels, region_labels
from autoseg.inference.model import TrainedModel
from autoseg.inference.sliding_window import predict_probabilities
from autoseg.io.images import Geometry
from autoseg.networks.call_size import PREDICTION_CPU_VOXELS, cpu_images_per_call
from autoseg.networks.precision import cpu_has_native_bf16, cuda_autocast_dtype
from autoseg.planning.planner import preprocessing_digest
from autoseg.planning.plans import Plans
from autoseg.planning.spacing import resampling_axis
from autoseg.preprocessing.crop import uncrop
from autoseg.preprocessing.preprocess import Preprocessed, class_values, preprocess_arrays
from autoseg.preprocessing.resample import resample_probabilities


@dataclass
class PredictionSettings:
    step: float = 0.5
    mirror: bool = True
    # Network inputs per call, windows x mirror flips; None: 4 on a GPU, on the CPU about 128k voxels.
    windows_per_batch: int | None = None
    # bf16 autocast on GPUs and CPUs with native bf16 (CUDA compute capability 8.0+; AVX-512 BF16, AMX): about
    # 2x faster on such CPUs, and scripts/bench_predict.py checks that Dice does not move. fp16 on older
    # CUDA GPUs. Elsewhere, and with False, float32.
    amp: bool = True
    save_probabilities: bool = False


@dataclass
class CasePrediction:
    labels: np.ndarray  # (Z, Y, X) original label values, original grid
    probabilities: np.ndarray | None  # (K, Z, Y, X) float16, original grid, when asked for
    label_values: list[int]  # the label value of each probability channel
    regions: bool = False  # the channels are region (sigmoid) probabilities, not softmax classes


def predict_case(model: TrainedModel | Sequence[TrainedModel], image: np.ndarray, geometry: Geometry,
                 settings: PredictionSettings, device: torch.device) -> CasePrediction:
    models = [model] if isinstance(model, TrainedModel) else list(model)
    plans = models[0].plans
    check_ensemble(models)
    for one in models:
        config = one.plans.configuration(one.configuration)
        if geometry.dimension == 2 and (config.dimensions == 3 or config.slicing_axis != 0):
            # Its placeholder slice spacing (999) would be "resampled" into ~999 interpolated slices.
            raise UsageError(f"a 2D image ({' x '.join(map(str, geometry.shape))}) cannot be predicted by the "
                             + (f"3D configuration {one.configuration}" if config.dimensions == 3 else
                                f"configuration {one.configuration}, which slices volumes across array axis "
                                f"{config.slicing_axis}") + "; give a 3D image, or a model of 2D images")
    # The label value of each output channel; for region outputs, the value each region writes.
    values = plans.regions_class_order if plans.has_regions else class_values(plans)
    keys = [(m.configuration, preprocessing_digest(m.plans, m.configuration)) for m in models]
    preprocessed: dict[tuple[str, str], Preprocessed] = {}
    running = (_RunningArgmax() if len(models) == 1 and not settings.save_probabilities and not plans.has_regions
               else None)
    total = None  # (K, *cropped original grid) summed over models, when several or when kept
    box = None
    for number, (one, key) in enumerate(zip(models, keys)):
        if key not in preprocessed:  # two architectures of one configuration share the preprocessing
            preprocessed[key] = preprocess_arrays(image, None, geometry, one.plans, one.configuration)
        pre = preprocessed[key] if key in keys[number + 1:] else preprocessed.pop(key)
        box, shape = pre.crop_box, pre.shape_after_crop
        back_axis = resampling_axis(pre.target_spacing, geometry.array_spacing)  # as nnU-Net decides the way back
        arch = one.plans.architecture(one.configuration, one.architecture)
        amp_dtype = inference_autocast_dtype(device) if settings.amp else None
        batch = settings.windows_per_batch or windows_per_batch(arch.patch_size, device)
        probabilities = _probabilities_on_device_or_host(
            one.networks, torch.from_numpy(pre.image), device, arch.patch_size, settings.step, settings.mirror,
            batch, amp_dtype, plans.has_regions)
        if pre.moved_axis:  # a 2D configuration's slice axis back where it was
            probabilities = probabilities.movedim(1, 1 + pre.moved_axis)
        del pre  # the preprocessed image is not needed on the way back
        for index in range(probabilities.shape[0]):
            # One class at a time back to the cropped original grid (linear; nearest along a thick-slice axis).
            channel = probabilities[index].float().numpy()[None]
            channel = resample_probabilities(channel, shape, back_axis)[0]
            if running is not None:
                running.update(index, channel)
                continue
            if total is None:
                total = np.zeros((len(values), *shape),
                                 dtype=np.float16 if len(models) == 1 else np.float32)
            total[index] += channel
        del probabilities
    if running is not None:
        cropped_labels = np.asarray(values, dtype=np.int16)[running.argmax]
    else:
        if len(models) > 1:
            total /= len(models)
        cropped_labels = probabilities_to_labels(total, plans)
    labels = uncrop(cropped_labels, box, geometry.array_shape, fill=0)
    full = None
    if settings.save_probabilities:
        full = uncrop(total.astype(np.float16, copy=False), box, geometry.array_shape, fill=0)
        if not plans.has_regions:
            full[0][_outside(box, geometry.array_shape)] = 1.0  # background outside the crop
    return CasePrediction(labels, full, values, plans.has_regions)


def same_outputs(plans, other) -> bool:
    """Whether two models read the same channels and write the same labels (or regions), in the same order."""
    return (plans.labels, plans.regions_class_order, plans.channel_names) == (
        other.labels, other.regions_class_order, other.channel_names)


def check_ensemble(models: Sequence[TrainedModel]) -> None:
    """Refuse an ensemble whose models differ in labels or channels: averaged channel by channel, they would
    mix unrelated classes."""
    for one in models[1:]:
        if not same_outputs(one.plans, models[0].plans):
            raise UsageError(f"the ensemble's models differ in labels or channels ({one.configuration}__"
                             f"{one.architecture} against {models[0].configuration}__{models[0].architecture}); "
                             "ensemble models of one dataset and plan only")


def _probabilities_on_device_or_host(networks, image: torch.Tensor, device: torch.device, patch_size, step: float,
                                     mirror: bool, batch: int, amp_dtype, sigmoid: bool) -> torch.Tensor:
    """Class probabilities with the image and the sums on ``device``; where that runs out of memory (a large
    scan with many classes on a small GPU: 105 classes of 512x512x400 voxels are 22 GB of float16 sums),
    again with only the windows on ``device`` and the image and sums in host memory, as nnU-Net does."""
    try:
        return predict_probabilities(networks, image.to(device), patch_size, step, mirror, batch, amp_dtype,
                                     sigmoid=sigmoid).cpu()
    except torch.OutOfMemoryError:
        pass  # out of the except block first, so the failed attempt's tensors can be freed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"predict: out of {device.type} memory with the whole image there; again with the image and the sums "
          "in host memory", file=sys.stderr, flush=True)
    try:
        return predict_probabilities(networks, image, patch_size, step, mirror, batch, amp_dtype, sigmoid=sigmoid,
                                     compute_device=device)
    except torch.OutOfMemoryError:
        raise UsageError(f"out of {device.type} memory even with the image and the sums in host memory: predict "
                         f"with --windows-per-batch 1, or --device cpu") from None


def probabilities_to_labels(probabilities: np.ndarray, plans: Plans) -> np.ndarray:
    """Label values from class probabilities (argmax) or from region probabilities (thresholds)."""
    if plans.has_regions:
        return region_labels(probabilities, plans.regions_class_order)
    return argmax_labels(probabilities, class_values(plans))


def windows_per_batch(patch_size: list[int], device: torch.device) -> int:
    if device.type != "cpu":
        return 4
    # About 128k voxels a call: one 40x56x40 window, its 8 flips one by one (networks/call_size.py).
    return min(32, cpu_images_per_call(patch_size, PREDICTION_CPU_VOXELS))


def inference_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of prediction on ``device``; None: float32."""
    if device.type == "cuda":  # fp16 where bf16 would be emulated (V100, T4), as nnU-Net predicts
        return cuda_autocast_dtype(device)
    if device.type == "cpu":  # emulated bf16 (no AVX-512 BF16 / AMX) is slower than float32
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


class _RunningArgmax:
    """argmax over classes seen one at a time, keeping two arrays of the grid instead of K.

    Ties go to the lower class index, as ``np.argmax`` does."""

    def __init__(self):
        self.best: np.ndarray | None = None
        self.argmax: np.ndarray | None = None

    def update(self, index: int, channel: np.ndarray) -> None:
        if self.best is None:
            self.best = np.array(channel, dtype=np.float32)
            self.argmax = np.zeros(channel.shape, dtype=np.int16)
            return
        better = channel > self.best
        np.copyto(self.best, channel, where=better)
        self.argmax[better] = index


def _outside(box: list[list[int]], shape: list[int]) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    return ~inside
