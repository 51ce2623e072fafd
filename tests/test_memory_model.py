"""The memory model against one real training step's measured peak, for every architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoseg.networks.registry import ARCHITECTURES
from scripts.bench_arch import run_child

HIPPOCAMPUS_PLANS = str(Path(__file__).resolve().parents[1] / "plans" / "Dataset004_Hippocampus.json")


# Known gaps, measured on the 2-core CI machine (2026-12-04), kept visible rather than hidden: strict, so
# a fix that brings either inside the band turns the test red until the mark is removed.
_KNOWN_GAPS = {
    "umamba_bot": "estimate 383 MB against a 186 MB peak: the scan's recomputation term (~0.3 GB whatever the "
                  "patch) overestimates small patches",
    "xlstm_unet": "estimate 237 MB against a 326 MB peak, not yet explained (measured without glibc's fixed mmap "
                  "threshold, which training sets for the U-Mambas only)",
}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("architecture", [
    pytest.param(name, marks=pytest.mark.xfail(reason=_KNOWN_GAPS[name], strict=True)) if name in _KNOWN_GAPS
    else name for name in sorted(ARCHITECTURES)])
def test_estimate_within_25_percent_of_measured_cpu_step_peak(architecture):
    # The planned 2d Hippocampus topology of each architecture at batch 4 (56x40; Swin 64x64): a
    # child process measures the resident-memory peak of one fp32 training step (weights,
    # gradients, momentum, activations, recomputation and loss) by the kernel's VmHWM.
    result = run_child(HIPPOCAMPUS_PLANS, "2d", architecture, "cpu", batch=4)
    assert result["peak_mb"] > 20  # a real step was measured
    ratio = result["estimate_mb"] / result["peak_mb"]
    assert 0.75 <= ratio <= 1.25, f"{architecture}: estimate {result['estimate_mb']:.0f} MB, peak {result['peak_mb']:.0f} MB"
