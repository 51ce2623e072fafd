"""A long folder is predicted in constant memory: nothing of a case is kept once it is written.

Memory is the process's resident set (RSS), not tracemalloc's count: torch allocates its
tensors outside Python's allocator, where tracemalloc sees nothing. A second test leaks one
torch tensor of a case's size per case and checks that this measurement sees it. Both measure in
a fresh interpreter, not in pytest's process, whose heap earlier tests have shaped.
(Peak RSS for 20 against 200 cases, and the cores used, are measured by scripts/bench_load.py.)
"""

import ctypes
import ctypes.util
import gc
import json
import os
import shutil
import subprocess
import sys
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
REPO = Path(__file__).resolve().parents[1]


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


def measure_rss_after_each_case(dataset: Path, model_folder: Path, work: Path, leak: bool) -> tuple[list[int], int]:
    """Predict CASES copies of one image and read RSS after each is written. Runs in a fresh process (see
    _rss_after_each_case), so the heap that earlier tests left behind does not move the figures."""
    inputs = work / "in"
    inputs.mkdir()
    for index in range(CASES):
        shutil.copy(dataset / "imagesTs" / "synth_006_0000.nii.gz", inputs / f"case{index:03d}_0000.nii.gz")
    one_case = int(np.prod(autoseg.io.images.read_header(inputs / "case000_0000.nii.gz")[0].shape)) * 4  # float32
    model = load_trained_model(model_folder, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    after_each_case, leaked = [], []
    write_label = autoseg.io.images.write_label

    def write_and_measure(*args, **kwargs):
        write_label(*args, **kwargs)
        if leak:
            leaked.append(torch.ones(one_case // 4))  # a case's float32 image, its pages touched
        _release_free_memory()
        after_each_case.append(resident_bytes())

    autoseg.io.images.write_label = write_and_measure
    result = predict_folder(model, inputs, work / "out", PredictionSettings(mirror=False), torch.device("cpu"),
                            progress=False)
    assert len(result.written) == CASES == len(after_each_case)
    return after_each_case[WARM_UP:-1], one_case  # the last case has no read-ahead


def _rss_after_each_case(pipeline, tmp_path, leak: bool = False) -> tuple[list[int], int]:
    # In its own interpreter: measured inside pytest's process, RSS moved with whatever earlier tests had
    # left in the heap, and the no-leak test failed now and then in full runs while passing alone.
    if not STATM.exists():
        pytest.skip("resident memory is read from /proc/self/statm (Linux)")
    probe = (f"import json, sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"from test_load import measure_rss_after_each_case as m; "
             f"print(json.dumps(m(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), {leak})))")
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", probe, str(pipeline.dataset), str(pipeline.fold.parent),
                           str(tmp_path)], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steady, one_case = json.loads(done.stdout.strip().splitlines()[-1])
    return steady, one_case


def _growth_per_case(steady: list[int]) -> float:
    return float(np.polyfit(np.arange(len(steady)), np.array(steady, dtype=float), 1)[0])


def test_memory_does_not_grow_from_case_to_case(pipeline, tmp_path):
    steady, one_case = _rss_after_each_case(pipeline, tmp_path)
    growth = _growth_per_case(steady)
    # A leak of anything per case (an array, a tensor, a future holding one) grows by at least a case's voxels.
    assert growth < 0.25 * one_case, f"RSS grows {growth:.0f} bytes per case (one case is {one_case} bytes)"


def test_the_measurement_sees_a_leaked_torch_tensor(pipeline, tmp_path):
    steady, one_case = _rss_after_each_case(pipeline, tmp_path, leak=True)
    growth = _growth_per_case(steady)
    # Seen at well above the no-leak test's bound (0.25 of a case), not exactly: how much of a leaked
    # 134 kB block shows in RSS depends on the holes in the heap (in pytest's own process it was 0.73
    # of it after the full suite, 1.0 alone; the probe's fresh process sees 1.0).
    assert 0.5 * one_case <= growth <= 1.5 * one_case, f"{growth:.0f} bytes per case seen, {one_case} leaked"
