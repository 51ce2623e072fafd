"""How many images one network call takes on the CPU.

On the CPU a convolution network runs fastest in calls of about 100-300k voxels (images x
patch voxels): larger calls run slower per image, their activations no longer fitting the
caches, and tiny ones pay the per-call overhead. Measured on a 2-core AVX-512-BF16 CPU
(bf16 autocast unless said; ``python scripts/bench_call_size.py`` repeats the sweep):

- prediction, 8 mirror flips of a Hippocampus 40x56x40 window, by images per call
  1 / 2 / 4 / 8: 0.40 / 0.51 / 0.56 / 0.63 s (float32: 1.20 / 1.08 / 1.22 / 1.25 s); ACDC 2d
  256x224, 16 slices: 0.71 / 0.65 / 0.79 s at 1 / 2 / 4, 0.97 s at 16; Hippocampus 2d 56x40,
  16 slices: 0.049 s one by one, 0.023 s in one call; a 128x160x128 window of a planned CT
  U-Net: 2.1 GB and 22 s alone, 4.2 GB and 58 s two at a time;
- a training step (forward, deep-supervision Dice+CE, backward) of the planned batch, by
  images per call: Hippocampus 3d_fullres batch 7: 1.72 / 1.22 / 1.17 / 1.19 s at 7 / 4 / 2 / 1
  (float32: 3.21 / 2.83 / 2.15 / 2.34 s); ACDC 2d batch 70: 21.4 / 15.7 / 9.4 / 9.8 s at
  70 / 35 / 4 / 2; ACDC 3d_fullres 20x256x224 batch 4: 38.6 / 21.7 / 20.6 s at 4 / 2 / 1 (with
  DynUNet's decoder kernels, before the U-Net took nnU-Net's: networks/unet.py);
  Hippocampus 2d batch 280: 1.48 / 1.02 / 1.28 s at 280 / 140 / 4.

Training's optimum lies higher than prediction's in these sweeps, hence its larger share.
GPUs are not split: they want the largest call that fits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

PREDICTION_CPU_VOXELS = 1 << 17
TRAINING_CPU_VOXELS = 1 << 18


def cpu_images_per_call(patch_size: Sequence[int], voxels: int) -> int:
    """Images of ``patch_size`` per network call on the CPU, for calls of about ``voxels`` voxels (at least 1)."""
    return max(1, voxels // math.prod(int(p) for p in patch_size))


def training_images_per_call(patch_size: Sequence[int], device: torch.device) -> int | None:
    """``TrainingLoop.images_per_call`` on ``device``: a share of the batch on the CPU, None (whole) elsewhere."""
    return cpu_images_per_call(patch_size, TRAINING_CPU_VOXELS) if device.type == "cpu" else None


def call_in_parts(model, image: torch.Tensor, images_per_call: int | None):
    """``model(image)`` computed ``images_per_call`` images at a time (None: in one call), outputs joined.

    Exact for networks whose layers work per sample (instance and layer norms, no batch norm)."""
    if not images_per_call or image.shape[0] <= images_per_call:
        return model(image)
    parts = [model(chunk) for chunk in image.split(images_per_call)]
    if isinstance(parts[0], (list, tuple)):  # deep supervision (a tensor per resolution), inpainting (image, mask)
        return [torch.cat(outputs) for outputs in zip(*parts)]
    return torch.cat(parts)
