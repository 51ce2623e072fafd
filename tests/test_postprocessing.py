import numpy as np
import pytest
import torch

from autoseg.inference.folder import predict_folder
from autoseg.inference.model import TrainedModel
from autoseg.inference.postprocessing import (ScoredCase, apply_postprocessing, determine_postprocessing,
                                              keep_largest_component, load_postprocessing, save_postprocessing)
from autoseg.inference.predictor import PredictionSettings
from autoseg.io.images import read_image, read_label, write_image
from autoseg.records import dumps
from tests.conftest import write_nifti
from tests.test_predict import NearestIntensity, plans  # noqa: F401 - a model that predicts by intensity; its plan


def _box(array, value, *slices):
    array[slices] = value
    return array


def test_keep_largest_component_uses_full_connectivity_and_touches_only_the_mask():
    labels = np.zeros((10, 10, 10), np.int16)
    _box(labels, 1, slice(0, 3), slice(0, 3), slice(0, 3))  # 27 voxels
    _box(labels, 1, slice(3, 4), slice(3, 4), slice(3, 4))  # touches the cube at a corner only: same component
    _box(labels, 1, slice(7, 9), slice(7, 9), slice(7, 9))  # 8 voxels, apart
    _box(labels, 2, slice(0, 2), slice(7, 9), slice(0, 2))  # another class, smaller than the kept component
    kept = keep_largest_component(labels, labels == 1)
    assert (kept == 1).sum() == 28 and kept[3, 3, 3] == 1 and kept[8, 8, 8] == 0
    assert np.array_equal(kept == 2, labels == 2)
    assert keep_largest_component(labels, labels == 5) is labels  # empty mask: nothing to do


def _write_case(folder, name, reference, prediction, spacing=(1.0, 1.0, 1.0)):
    write_nifti(folder / "ref" / f"{name}.nii.gz", reference, spacing=spacing)
    write_nifti(folder / "pred" / f"{name}.nii.gz", prediction, spacing=spacing)
    return ScoredCase(name, folder / "ref" / f"{name}.nii.gz", folder / "pred" / f"{name}.nii.gz")


def test_a_step_is_kept_only_where_it_raises_dice(tmp_path):
    reference = np.zeros((16, 16, 16), np.uint8)
    _box(reference, 1, slice(2, 5), slice(2, 5), slice(2, 5))  # class one: 27 voxels
    _box(reference, 2, slice(2, 5), slice(10, 13), slice(2, 5))  # class two: two separate cubes of 27
    _box(reference, 2, slice(2, 5), slice(10, 13), slice(10, 13))
    prediction = _box(reference.copy(), 1, slice(12, 14), slice(12, 14), slice(12, 14))  # spurious: 8 voxels of one
    cases = [_write_case(tmp_path, "a", reference, prediction), _write_case(tmp_path, "b", reference, reference)]
    labels = {"background": 0, "one": 1, "two": 2}
    decision = determine_postprocessing(cases, labels, "test", num_processes=1, progress=False)
    # All foreground: its largest component is one cube of three, which costs far more than it gains.
    assert decision.largest_foreground_component is False
    # Class one loses its stray voxels (Dice 2*27/(35+27) -> 1 on case a); class two would lose a true cube.
    assert decision.largest_component_classes == {"one": [1]}
    assert decision.dice_before == pytest.approx({"one": (54 / 62 + 1) / 2, "two": 1.0})
    assert decision.dice_after == pytest.approx({"one": 1.0, "two": 1.0})
    assert decision.mean_dice_after == pytest.approx(1.0) and decision.num_cases == 2
    two = next(s for s in decision.steps if s.target == "two")
    assert not two.kept and two.dice_with == pytest.approx((2 * 27 / 81 + 2 * 27 / 81) / 2)
    assert np.array_equal(apply_postprocessing(prediction, decision), reference)
    save_postprocessing(decision, tmp_path)
    assert dumps(load_postprocessing(tmp_path)) == dumps(decision)  # equal up to the float format of JSON
    assert load_postprocessing(tmp_path / "elsewhere") is None


def test_regions_are_measured_together_once_a_region_step_is_kept(tmp_path):
    """Removing a stray 'core' blob also raises 'whole' (the blob was in it): the final Dice is measured."""
    reference = np.zeros((16, 16, 16), np.uint8)
    _box(reference, 1, slice(2, 6), slice(2, 6), slice(2, 6))  # whole only: 64 voxels
    _box(reference, 1, slice(2, 6), slice(9, 14), slice(2, 6))  # a second structure, 80 voxels ...
    _box(reference, 2, slice(3, 5), slice(10, 13), slice(3, 5))  # ... with a core of 12 inside
    prediction = _box(reference.copy(), 2, slice(12, 14), slice(12, 14), slice(12, 14))  # stray core: 8 voxels
    cases = [_write_case(tmp_path, "a", reference, prediction, spacing=(0.8, 0.8, 2.5))]
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    decision = determine_postprocessing(cases, labels, "test", num_processes=1, progress=False)
    assert not decision.largest_foreground_component  # would drop one of the two structures
    assert decision.largest_component_classes == {"core": [2]}  # 'whole' alone would drop one too
    assert decision.dice_before == pytest.approx({"whole": 2 * 144 / 296, "core": 2 * 12 / 32})
    assert decision.dice_after == pytest.approx({"whole": 1.0, "core": 1.0})


def test_ignored_voxels_do_not_count(tmp_path):
    reference = np.zeros((10, 10, 10), np.uint8)
    _box(reference, 1, slice(1, 4), slice(1, 4), slice(1, 4))
    _box(reference, 9, slice(7, 10), slice(7, 10), slice(7, 10))  # ignore
    prediction = _box(reference.copy(), 1, slice(8, 10), slice(8, 10), slice(8, 10))  # a blob under ignore
    decision = determine_postprocessing([_write_case(tmp_path, "a", reference, prediction)],
                                        {"background": 0, "one": 1, "ignore": 9}, "test", 1, False)
    assert decision.dice_before == {"one": 1.0} and not decision.changes_anything


def test_predict_folder_applies_the_decision(synthetic_raw, plans, tmp_path):  # noqa: F811
    case = "synth_000"
    label, geometry = read_label(synthetic_raw / "labelsTr" / f"{case}.nii.gz")
    stray = label.copy()
    stray[0, :3, :3] = np.where(stray[0, :3, :3] == 0, 1, stray[0, :3, :3])  # a blob of class 1 in a corner
    assert (stray != label).sum() > 0
    (tmp_path / "in").mkdir()
    write_image(stray.astype(np.float32) * 10.0 + 5.0, tmp_path / "in" / f"{case}_0000.nii.gz", geometry)
    image, _ = read_image(tmp_path / "in" / f"{case}_0000.nii.gz")
    centres = ((np.array([5.0, 15.0, 25.0]) - image[0].mean()) / image[0].std()).tolist()
    model = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity(centres)], ["0"])
    decision = determine_postprocessing(
        [_write_case(tmp_path, "x", label, stray, spacing=tuple(geometry.spacing))],
        {"background": 0, "organ_a": 1, "organ_b": 2}, "test", 1, False)
    assert decision.changes_anything
    settings = PredictionSettings(mirror=False)
    predict_folder(model, tmp_path / "in", tmp_path / "raw_out", settings, torch.device("cpu"), progress=False)
    predict_folder(model, tmp_path / "in", tmp_path / "pp_out", settings, torch.device("cpu"), progress=False,
                   postprocessing=decision)
    assert np.array_equal(read_label(tmp_path / "raw_out" / f"{case}.nii.gz")[0], stray)
    assert np.array_equal(read_label(tmp_path / "pp_out" / f"{case}.nii.gz")[0], label)
