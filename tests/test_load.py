"""A long folder is predicted in constant memory: nothing of a case is kept once it is written.

Memory is the process's resident set (RSS), not tracemalloc's count: torch allocates its
tensors outside Python's allocator, where tracemalloc sees nothing. A second test leaks one
torch tensor of a case's size per case and checks that this measurement sees it.
(Peak RSS for 20 against 200 cases, and the cores used, are measured by scripts/bench_load.py.)
"""

import ctypes
import ctypes.util
import gc
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import autoseg.io.images
from autoseg.inference.folder import predict_folder
from autoseg.inference.model import load_trained_model
from autoseg.inference.predictor import PredictionSettings

torch.set_num_threads(1)
CASES = 14
WARM_UP = 4  # first cases fill caches (MONAI's Gaussian window, numpy's small-object pools, malloc arenas)
STATM = Path("/proc/self/statm")


def resident_bytes() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back (glibc keeps them otherwise), so RSS is what is alive."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim:
            trim(0)


def _rss_after_each_case(pipeline, tmp_path, monkeypatch, leak: bool = False) -> tuple[list[int], int]:
    if not STATM.exists():
        pytest.skip("resident memory is read from /proc/self/statm (Linux)")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(CASES):
        shutil.copy(pipeline.dataset / "imagesTs" / "synth_006_0000.nii.gz", inputs / f"case{index:03d}_0000.nii.gz")
    one_case = int(np.prod(autoseg.io.images.read_header(inputs / "case000_0000.nii.gz")[0].shape)) * 4  # float32
    model = load_trained_model(pipeline.fold.parent, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    after_each_case, leaked = [], []
    write_label = autoseg.io.images.write_label

    def write_and_measure(*args, **kwargs):
        write_label(*args, **kwargs)
        if leak:
            leaked.append(torch.ones(one_case // 4))  # a case's float32 image, its pages touched
        _release_free_memory()
        after_each_case.append(resident_bytes())

    monkeypatch.setattr(autoseg.io.images, "write_label", write_and_measure)
    result = predict_folder(model, inputs, tmp_path / "out", PredictionSettings(mirror=False), torch.device("cpu"),
                            progress=False)
    assert len(result.written) == CASES == len(after_each_case)
    return after_each_case[WARM_UP:-1], one_case  # the last case has no read-ahead


def _growth_per_case(steady: list[int]) -> float:
    return float(np.polyfit(np.arange(len(steady)), np.array(steady, dtype=float), 1)[0])


def test_memory_does_not_grow_from_case_to_case(pipeline, tmp_path, monkeypatch):
    steady, one_case = _rss_after_each_case(pipeline, tmp_path, monkeypatch)
    growth = _growth_per_case(steady)
    # A leak of anything per case (an array, a tensor, a future holding one) grows by at least a case's voxels.
    assert growth < 0.25 * one_case, f"RSS grows {growth:.0f} bytes per case (one case is {one_case} bytes)"


def test_the_measurement_sees_a_leaked_torch_tensor(pipeline, tmp_path, monkeypatch):
    steady, one_case = _rss_after_each_case(pipeline, tmp_path, monkeypatch, leak=True)
    growth = _growth_per_case(steady)
    # Seen at well above the no-leak test's bound (0.25 of a case), not exactly: how much of a leaked
    # 134 kB block shows in RSS depends on the holes earlier tests left in this process's heap
    # (0.73 of it after the full suite, 1.0 alone).
    assert 0.5 * one_case <= growth <= 1.5 * one_case, f"{growth:.0f} bytes per case seen, {one_case} leaked"
