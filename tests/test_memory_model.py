"""The memory model against one real training step's measured peak, for every architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoseg.networks.registry import ARCHITECTURES
from scripts.bench_arch import run_child

HIPPOCAMPUS_PLANS = str(Path(__file__).resolve().parents[1] / "plans" / "Dataset004_Hippocampus.json")

# Every architecture in fp32 and under bf16 autocast (what training uses on a CPU with native bf16).
POINTS = [(name, precision) for name in sorted(ARCHITECTURES) for precision in ("fp32", "bf16")]

@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("architecture, precision", POINTS)
def test_estimate_within_25_percent_of_measured_cpu_step_peak(architecture, precision):
    # The planned 2d Hippocampus topology of each architecture at batch 4 (56x40; Swin 64x64): a
    # child process measures the resident-memory peak of one steady-state training step (weights,
    # gradients, momentum, activations, recomputation and loss) by the kernel's VmHWM.
    result = run_child(HIPPOCAMPUS_PLANS, "2d", architecture, "cpu", batch=4, precision=precision)
    assert result["precision"] == precision
    assert result["peak_mb"] > 20  # a real step was measured
    ratio = result["estimate_mb"] / result["peak_mb"]
    assert 0.75 <= ratio <= 1.25, (f"{architecture} ({precision}): estimate {result['estimate_mb']:.0f} MB, "
                                   f"peak {result['peak_mb']:.0f} MB")
