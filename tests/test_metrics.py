import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from autoseg.cli import main
from autoseg.errors import DatasetError
from autoseg.evaluation.evaluate import evaluate_folder
from autoseg.evaluation.metrics import pair_metrics
from tests.conftest import write_nifti


def _cube(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_two_cubes_a_known_distance_apart():
    reference = _cube((20, 20, 30), (5, 5, 5), 6)
    prediction = _cube((20, 20, 30), (5, 5, 9), 6)  # shifted 4 voxels along x (2 mm each)
    m = pair_metrics(reference, prediction, [1.0, 1.0, 2.0], tolerance_mm=1.0)
    assert m.dice == pytest.approx(2 * 72 / 432)  # overlap 6*6*2 voxels of 216 each
    assert m.iou == pytest.approx(72 / (432 - 72))
    # Faces perpendicular to x are 8 mm apart; every surface voxel is at most 8 mm away.
    assert m.hd95 == pytest.approx(8.0)


def test_identical_masks_and_the_empty_mask_rules():
    mask = _cube((10, 10, 10), (2, 2, 2), 4)
    same = pair_metrics(mask, mask, [1, 1, 1])
    assert (same.dice, same.iou, same.hd95, same.nsd) == (1.0, 1.0, 0.0, 1.0)
    empty = np.zeros_like(mask)
    both = pair_metrics(empty, empty, [1, 1, 1])
    assert (both.dice, both.iou, both.hd95, both.nsd) == (1.0, 1.0, 0.0, 1.0)
    one = pair_metrics(mask, empty, [1, 1, 1])
    assert (one.dice, one.iou, one.nsd) == (0.0, 0.0, 0.0) and math.isnan(one.hd95)


def test_nsd_below_and_above_the_shift():
    reference = _cube((12, 20, 20), (3, 5, 5), 6)
    prediction = _cube((12, 20, 20), (3, 5, 7), 6)  # shifted by 2 voxels of 1.5 mm = 3 mm
    spacing = [1.0, 1.0, 1.5]
    assert pair_metrics(reference, prediction, spacing, tolerance_mm=2.0).nsd < 1.0
    assert pair_metrics(reference, prediction, spacing, tolerance_mm=3.1).nsd == 1.0


@pytest.mark.parametrize("shape, spacing", [((16, 40, 36), [3.0, 0.8, 0.7]), ((1, 64, 48), [999.0, 0.5, 0.5])])
def test_hd95_and_nsd_equal_monai_on_random_shapes(shape, spacing):
    rng = np.random.default_rng(1)
    for _ in range(3):
        a = ndimage.gaussian_filter(rng.random(shape), 2.5) > 0.5
        b = ndimage.gaussian_filter(rng.random(shape), 2.5) > 0.5
        ours = pair_metrics(a, b, spacing, tolerance_mm=1.2)
        squeeze = shape[0] == 1
        used = spacing[1:] if squeeze else spacing
        A = torch.from_numpy(np.stack([~a, a])[:, 0] if squeeze else np.stack([~a, a]))[None].float()
        B = torch.from_numpy(np.stack([~b, b])[:, 0] if squeeze else np.stack([~b, b]))[None].float()
        hd = compute_hausdorff_distance(B, A, include_background=False, percentile=95, spacing=used).item()
        nsd = compute_surface_dice(B, A, class_thresholds=[1.2], include_background=False, spacing=used).item()
        assert ours.hd95 == pytest.approx(hd, abs=1e-3)
        assert ours.nsd == pytest.approx(nsd, abs=1e-3)


def test_evaluate_folder_regions_ignore_and_files(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    reference = np.zeros((8, 12, 12), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    reference[2:6, 6:10, 2:6] = 2
    reference[0, 0, :4] = 3  # ignore
    prediction = reference.copy()
    prediction[2:6, 6:10, 2:6] = 1  # class 2 predicted as 1: the region {1, 2} is still perfect
    prediction[0, 0, :4] = 1  # under the ignore label: does not count
    write_nifti(ref_dir / "a.nii.gz", reference, spacing=(0.5, 0.5, 2.0))
    write_nifti(pred_dir / "a.nii.gz", prediction, spacing=(0.5, 0.5, 2.0))
    labels = {"background": 0, "one": 1, "two": 2, "both": [1, 2], "ignore": 3}
    summary = evaluate_folder(ref_dir, pred_dir, labels, ".nii.gz", 1.0, num_processes=1, output_dir=tmp_path / "out",
                              progress=False)
    assert summary.per_class["both"].mean["dice"] == 1.0
    assert summary.per_class["one"].mean["dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert summary.per_class["two"].mean["dice"] == 0.0 and summary.per_class["two"].n_undefined_hd95 == 1
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["per_case"][0]["two/hd95"] is None and "empty" in saved["empty_mask_rules"]
    assert (tmp_path / "out" / "per_case.csv").read_text().splitlines()[0].startswith("case,one/dice")
    (pred_dir / "a.nii.gz").unlink()
    with pytest.raises(DatasetError, match="no prediction for 1 reference"):
        evaluate_folder(ref_dir, pred_dir, labels, ".nii.gz", num_processes=1, progress=False)


def test_summary_over_cases_means_and_stds_by_hand(tmp_path):
    # Class 1 right in both cases; class 2 right in case a, missed in case b (Dice 1 and 0, HD95 0 and
    # undefined). Hand values: class 2's Dice mean 0.5, std 0.5 (over cases, ddof 0); its HD95 mean is
    # over the one case where it is defined; the foreground mean is the mean of the class means.
    reference = np.zeros((6, 10, 10), np.uint8)
    reference[1:4, 1:4, 1:4] = 1
    reference[1:4, 5:9, 5:9] = 2
    missed = reference.copy()
    missed[missed == 2] = 0
    for case, prediction in [("a", reference), ("b", missed)]:
        write_nifti(tmp_path / "ref" / f"{case}.nii.gz", reference)
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", prediction)
    labels = {"background": 0, "one": 1, "two": 2}
    summary = evaluate_folder(tmp_path / "ref", tmp_path / "pred", labels, ".nii.gz", 1.0, num_processes=1,
                              progress=False)
    two = summary.per_class["two"]
    assert (two.mean["dice"], two.std["dice"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (two.mean["iou"], two.mean["nsd"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert two.mean["hd95"] == 0.0 and two.n_undefined_hd95 == 1
    assert (summary.per_class["one"].mean["dice"], summary.per_class["one"].std["dice"]) == (1.0, 0.0)
    assert summary.mean_foreground["dice"] == pytest.approx(0.75)


def test_evaluate_command_prints_a_table(synthetic_raw, tmp_path, capsys):
    code = main(["evaluate", str(synthetic_raw / "labelsTr"), str(synthetic_raw / "labelsTr"), "-d", "999",
                 f"--raw={synthetic_raw.parent}", "-o", str(tmp_path), "-np", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "organ_a" in out and "1.0000 ± 0.0000" in out
    assert json.loads((tmp_path / "summary.json").read_text())["mean_foreground"]["dice"] == 1.0


def test_evaluate_reads_the_dataset_json_it_is_given_not_its_neighbour(synthetic_raw, tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "spleen": 1, "liver": 2}}))
    given = json.loads((synthetic_raw / "dataset.json").read_text())
    (labels / "my_labels.json").write_text(json.dumps(given))
    code = main(["evaluate", str(synthetic_raw / "labelsTr"), str(synthetic_raw / "labelsTr"), "--dataset-json",
                 str(labels / "my_labels.json"), "-o", str(tmp_path / "out"), "-np", "1"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["per_class"]) == {name for name in given["labels"] if name != "background"}


def test_a_jpeg_datasets_references_pair_with_the_png_predictions_autoseg_writes(tmp_path):
    from autoseg.evaluation.evaluate import pair_label_files

    for folder, name in (("refs", "a.jpg"), ("refs", "b.jpg"), ("preds", "a.png"), ("preds", "b.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"")
    assert pair_label_files(tmp_path / "refs", tmp_path / "preds", ".jpg") == [("a.jpg", "a.png"), ("b.jpg", "b.png")]


def test_a_tolerance_for_a_class_the_labels_lack_is_refused(tmp_path):
    from autoseg.errors import UsageError

    (tmp_path / "refs").mkdir()
    with pytest.raises(UsageError, match="NSD tolerance given for livr, not classes of these labels"):
        evaluate_folder(tmp_path / "refs", tmp_path / "refs", {"background": 0, "liver": 1}, ".nii.gz",
                        {"livr": 2.0}, num_processes=1, progress=False)
