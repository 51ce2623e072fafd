import numpy as np
import pytest

from autoseg.fingerprint import IntensityStats, compute_fingerprint, load_fingerprint, save_fingerprint
from autoseg.records import dumps
from tests.conftest import write_nifti


def test_intensity_statistics_of_one_to_two_hundred():
    # Hand values for 1..200 (linear-interpolated percentiles, as nnU-Net's fingerprint takes them):
    # the 0.5th percentile sits 0.995 of the way from 1 to 2, the 99.5th 0.005 of the way from 199 to 200,
    # and the population std of 1..n is sqrt((n^2 - 1) / 12).
    stats = IntensityStats.of(np.arange(1, 201, dtype=np.float32))
    assert stats.percentile_00_5 == pytest.approx(1.995) and stats.percentile_99_5 == pytest.approx(199.005)
    assert stats.mean == pytest.approx(100.5) and stats.median == pytest.approx(100.5)
    assert stats.std == pytest.approx((39999 / 12) ** 0.5)
    assert (stats.min, stats.max, stats.num_samples) == (1.0, 200.0, 200)
    assert IntensityStats.of(np.array([], np.float32)).num_samples == 0


def test_known_case_is_measured_exactly(tmp_path):
    import json

    root = tmp_path / "Dataset002_Known"
    image = np.zeros((6, 10, 12), np.float32)
    image[1:5, 2:8, 3:9] = 5.0  # the non-zero box the crop must find
    label = np.zeros_like(image, dtype=np.uint8)
    label[2:4, 3:5, 4:6] = 1  # 2*2*2 = 8 voxels of intensity 5
    label[2, 6, 7] = 1  # a second component of class 1
    image[2, 6, 7] = 9.0
    write_nifti(root / "imagesTr" / "k_0000.nii.gz", image, spacing=(0.5, 0.5, 2.0))
    write_nifti(root / "labelsTr" / "k.nii.gz", label, spacing=(0.5, 0.5, 2.0))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1}))
    fp = compute_fingerprint(root, num_processes=1, progress=False)
    case = fp.cases[0]
    assert case.spacing == [2.0, 0.5, 0.5]
    assert case.shape_before_crop == [6, 10, 12] and case.shape_after_crop == [4, 6, 6]
    assert case.crop_box == [[1, 5], [2, 8], [3, 9]]
    assert case.classes["1"].voxels == 9 and case.classes["1"].num_components == 2
    assert case.classes["1"].largest_components == [8, 1] and case.classes["2"].voxels == 0
    assert case.intensity[0].mean == pytest.approx((8 * 5 + 9) / 9)
    assert case.intensity[0].max == 9.0 and case.anisotropy == 4.0


def test_fingerprint_is_byte_identical_whatever_the_process_count(synthetic_raw, tmp_path):
    one = dumps(compute_fingerprint(synthetic_raw, num_processes=1, progress=False))
    two = dumps(compute_fingerprint(synthetic_raw, num_processes=2, progress=False))
    assert one == two
    save_fingerprint(compute_fingerprint(synthetic_raw, 1, False), tmp_path / "f.json")
    assert dumps(load_fingerprint(tmp_path / "f.json")) == one
