"""Intensity normalisation of one image, as the plan says (see planning/normalization.py for why)."""

from __future__ import annotations

import numpy as np

from autoseg.planning.plans import ChannelNormalization


def normalize(image: np.ndarray, schemes: list[ChannelNormalization], mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise ``image`` ``(C, ...)`` channel by channel; ``mask`` is the non-zero region."""
    out = np.empty(image.shape, dtype=np.float32)
    for channel, norm in enumerate(schemes):
        data = image[channel].astype(np.float32, copy=False)
        if norm.scheme == "ct":
            clipped = np.clip(data, norm.clip_low, norm.clip_high)
            out[channel] = (clipped - norm.mean) / max(norm.std, 1e-8)
        elif norm.scheme == "zscore":
            out[channel] = (data - data.mean()) / max(float(data.std()), 1e-8)
        elif norm.scheme == "zscore_mask":
            region = mask if mask is not None and mask.any() else np.ones(data.shape, bool)
            values = data[region]
            normed = (data - values.mean()) / max(float(values.std()), 1e-8)
            out[channel] = np.where(region, normed, 0.0)
        elif norm.scheme == "rescale01":
            low, high = float(data.min()), float(data.max())
            out[channel] = (data - low) / max(high - low, 1e-8)
        elif norm.scheme == "rgb255":  # nnU-Net's RGBTo01Normalization: colour keeps its meaning across images
            out[channel] = data / 255.0
        else:
            out[channel] = data
    return out
