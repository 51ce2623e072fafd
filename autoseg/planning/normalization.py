"""Normalisation per channel, chosen from the channel name and the fingerprint (nnU-Net's rules).

* ``CT`` channels: intensities are physical (HU), so one dataset-wide transform fits all
  images: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std.
* ``rgb_to_0_1`` (nnU-Net's name): 8-bit colour divided by 255, the same scale for every image.
* ``rescale_to_0_1`` (nnU-Net's name): per image, min/max to [0, 1].
* ``noNorm`` (nnU-Net's name): left as it is (masks, priors, already normalised channels).
* Anything else (MRI, ...): z-score per image, since MRI intensities have no fixed scale;
  restricted to the non-zero mask when cropping to non-zero shrank the median image to
  under 3/4 (skull-stripped brains: the zero background is not tissue).
"""

from __future__ import annotations

from autoseg.errors import PlanError
from autoseg.fingerprint import DatasetFingerprint
from autoseg.planning.plans import ChannelNormalization

MASK_NORMALIZATION_BELOW = 0.75


def plan_normalization(fingerprint: DatasetFingerprint) -> list[ChannelNormalization]:
    result = []
    for name, stats in zip(fingerprint.channel_names, fingerprint.foreground_intensity):
        key = name.strip().lower()
        if key == "ct":
            if stats.num_samples == 0:  # the clip window would be [0, 0]: every image would become 0
                raise PlanError(f"channel '{name}' is CT, but no training case has a labelled (foreground) voxel "
                                "to take its intensity statistics from")
            result.append(ChannelNormalization(name, "ct", stats.percentile_00_5, stats.percentile_99_5,
                                               stats.mean, max(stats.std, 1e-8)))
        elif key == "rgb_to_0_1":
            result.append(ChannelNormalization(name, "rgb255"))
        elif key == "rescale_to_0_1":
            result.append(ChannelNormalization(name, "rescale01"))
        elif key == "nonorm":
            result.append(ChannelNormalization(name, "none"))
        elif fingerprint.median_relative_size_after_crop < MASK_NORMALIZATION_BELOW:
            result.append(ChannelNormalization(name, "zscore_mask"))
        else:
            result.append(ChannelNormalization(name, "zscore"))
    return result
