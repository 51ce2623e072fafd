"""A long folder is predicted in constant memory: nothing of a case is kept once it is written.

(Peak RSS for 20 against 200 cases, and the cores used, are measured by scripts/bench_load.py.)
"""

import gc
import shutil
import tracemalloc

import numpy as np
import torch

import autoseg.io.images
from autoseg.inference.folder import predict_folder
from autoseg.inference.model import load_trained_model
from autoseg.inference.predictor import PredictionSettings

torch.set_num_threads(1)
CASES = 16
WARM_UP = 4  # first cases fill caches (MONAI's Gaussian window, numpy's small-object pools)


def test_memory_does_not_grow_from_case_to_case(pipeline, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(CASES):
        shutil.copy(pipeline.dataset / "imagesTs" / "synth_006_0000.nii.gz", inputs / f"case{index:03d}_0000.nii.gz")
    model = load_trained_model(pipeline.fold.parent, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    after_each_case = []
    write_label = autoseg.io.images.write_label

    def write_and_measure(*args, **kwargs):
        write_label(*args, **kwargs)
        gc.collect()  # what is still referenced, not garbage the collector has yet to reach
        after_each_case.append(tracemalloc.get_traced_memory()[0])

    monkeypatch.setattr(autoseg.io.images, "write_label", write_and_measure)
    gc.freeze()  # what exists now is not garbage: keeps each gc.collect() to the objects a case made
    tracemalloc.start()
    try:
        result = predict_folder(model, inputs, tmp_path / "out", PredictionSettings(mirror=False), torch.device("cpu"),
                                progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    assert len(result.written) == CASES == len(after_each_case)
    steady = np.array(after_each_case[WARM_UP:-1], dtype=float)  # the last case has no read-ahead
    slope = np.polyfit(np.arange(steady.size), steady, 1)[0]
    one_case = np.prod(autoseg.io.images.read_header(inputs / "case000_0000.nii.gz")[0].shape) * 4  # float32 bytes
    # A leak of anything per case (an array, a future holding one) grows by at least a case's voxels.
    assert slope < 0.02 * one_case, f"{slope:.0f} bytes more per case (one case is {one_case} bytes)"
    assert steady.max() - steady.min() < 0.5 * one_case
    assert peak < 40 * one_case, "no more than a few cases' worth of arrays alive at once"
