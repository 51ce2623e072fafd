"""The intensity window a case is drawn with.

CT intensities are physical (HU), so one window fits every case: the 0.5 and 99.5
percentiles of the dataset's foreground intensities measured by the fingerprint (the
window the network's normalisation clips to). Other modalities have no fixed scale, so
each image gets its own 0.5-99.5 percentile window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.fingerprint import load_fingerprint
from autoseg.planning.plans import Plans

PERCENTILES = (0.5, 99.5)


@dataclass
class WindowRule:
    """How a report windows its images: a fixed window (``low``/``high``), or per case."""

    low: float | None
    high: float | None
    source: str
    # A CT channel without dataset statistics: the case's own foreground percentiles, the
    # same rule the fingerprint applies to the whole dataset.
    per_case_foreground: bool = False


def ct_window(channel: int, channel_name: str, plans: Plans | None, fingerprint_file: Path | None) -> WindowRule | None:
    """The window rule of a CT channel, or None when the channel is drawn with each image's percentiles.

    The plan says which channels are CT (its normalisation scheme); without a plan the
    channel name does. The numbers come from the fingerprint, or from the plan's clip
    values (the same numbers) when a trained model travelled without its fingerprint.
    """
    is_ct = plans.normalization[channel].scheme == "ct" if plans else channel_name.strip().lower() == "ct"
    if not is_ct:
        return None
    if fingerprint_file is not None and fingerprint_file.is_file():
        stats = load_fingerprint(fingerprint_file).foreground_intensity
        if channel < len(stats):
            return WindowRule(stats[channel].percentile_00_5, stats[channel].percentile_99_5,
                              "CT: foreground 0.5-99.5 percentiles of the dataset fingerprint")
    if plans and plans.normalization[channel].clip_low is not None:
        norm = plans.normalization[channel]
        return WindowRule(float(norm.clip_low), float(norm.clip_high), "CT: the plan's clip window")
    return WindowRule(None, None, "CT: foreground 0.5-99.5 percentiles of this case (no fingerprint)", True)


def intensity_window(image: np.ndarray, rule: WindowRule | None, foreground: np.ndarray | None = None
                     ) -> tuple[float, float, str]:
    """(low, high, where it came from) for drawing ``image`` (``(Z, Y, X)``, or ``(Z, Y, X, 3)`` for colour).

    ``foreground`` (the reference's objects) is used by a per-case CT rule; a case without
    any falls back to the whole image's percentiles.
    """
    if rule is not None and rule.low is not None:
        low, high, source = rule.low, rule.high, rule.source
    elif image.ndim == 4 and image.min(initial=0) >= 0 and image.max(initial=0) <= 255:
        low, high, source = 0.0, 255.0, "8-bit colour as stored"  # stretching would change the colours
    else:
        use_foreground = rule is not None and foreground is not None and foreground.any()
        values = image[foreground] if use_foreground else image
        finite = values[np.isfinite(values)]
        low, high = (np.percentile(finite, PERCENTILES) if finite.size else (0.0, 1.0))
        source = rule.source if use_foreground else "image 0.5-99.5 percentiles"
    if not high > low:  # a constant image: any window shows it
        high = low + 1.0
    return float(low), float(high), source
