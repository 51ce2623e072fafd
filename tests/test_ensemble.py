import numpy as np
import pytest
import torch

from autoseg.commands.predict import model_pairs
from autoseg.errors import AutosegError, UsageError
from autoseg.inference.ensemble import labels_from_probability_files, save_probability_file
from autoseg.inference.model import TrainedModel
from autoseg.inference.predictor import PredictionSettings, predict_case
from autoseg.io.images import read_label
from tests.test_predict import NearestIntensity, plans  # noqa: F401 - a model that predicts by intensity; its plan


def test_model_pairs_broadcast_a_single_value_and_refuse_mismatches(capsys):
    assert model_pairs(["2d", "3d_fullres"], ["unet"]) == [("2d", "unet"), ("3d_fullres", "unet")]
    assert model_pairs(None, ["unet", "resenc_unet"]) == [(None, "unet"), (None, "resenc_unet")]
    assert model_pairs(["2d", "3d_fullres"], ["unet", "resenc_unet"]) == [("2d", "unet"), ("3d_fullres", "resenc_unet")]
    with pytest.raises(UsageError, match="3 configurations and 2 architectures"):
        model_pairs(["2d", "3d_fullres", "3d_lowres"], ["unet", "resenc_unet"])
    with pytest.raises(UsageError, match="named twice"):
        model_pairs(["2d", "2d"], ["unet"])


def test_probability_files_average_into_labels_and_refuse_what_does_not_fit(tmp_path):
    first = np.array([[0.7, 0.2], [0.1, 0.5], [0.2, 0.3]])[:, None, None, :]  # (3 classes, 1, 1, 2 voxels)
    second = np.array([[0.1, 0.2], [0.1, 0.1], [0.8, 0.7]])[:, None, None, :]
    save_probability_file(tmp_path / "a.npz", first, [0, 1, 4])
    save_probability_file(tmp_path / "b.npz", second, [0, 1, 4])
    # means: voxel 0 -> (0.4, 0.1, 0.5): label 4; voxel 1 -> (0.2, 0.3, 0.5): label 4; first alone: 0 and 1
    assert labels_from_probability_files([tmp_path / "a.npz"]).ravel().tolist() == [0, 1]
    assert labels_from_probability_files([tmp_path / "a.npz", tmp_path / "b.npz"]).ravel().tolist() == [4, 4]
    save_probability_file(tmp_path / "c.npz", second, [0, 1, 2])
    with pytest.raises(AutosegError, match="c.npz: does not fit"):
        labels_from_probability_files([tmp_path / "a.npz", tmp_path / "c.npz"])
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(AutosegError, match="d.npz: not an autoseg probability file"):
        labels_from_probability_files([tmp_path / "d.npz"])


def test_region_probability_files_ensemble_by_threshold_in_region_order(tmp_path):
    # Two regions, as BraTS-like plans have them: whole (writes 1), then the nested core (writes 2).
    # Voxels: [outside, whole only, whole and core, core above 0.5 only on average]
    first = np.array([[0.1, 0.9, 0.9, 0.8], [0.0, 0.2, 0.9, 0.3]])[:, None, None, :]
    second = np.array([[0.2, 0.7, 0.8, 0.9], [0.1, 0.4, 0.7, 0.9]])[:, None, None, :]
    save_probability_file(tmp_path / "a.npz", first, [1, 2], regions=True)
    save_probability_file(tmp_path / "b.npz", second, [1, 2], regions=True)
    assert labels_from_probability_files([tmp_path / "a.npz"]).ravel().tolist() == [0, 1, 2, 1]
    # the mean core probability of the last voxel is 0.6: the threshold rule gives 2; an argmax
    # over the two region channels would have said 1 (0.85 > 0.6)
    assert labels_from_probability_files([tmp_path / "a.npz", tmp_path / "b.npz"]).ravel().tolist() == [0, 1, 2, 2]
    save_probability_file(tmp_path / "softmax.npz", first, [1, 2])
    with pytest.raises(AutosegError, match="softmax.npz: does not fit .*classes vs regions"):
        labels_from_probability_files([tmp_path / "a.npz", tmp_path / "softmax.npz"])


def test_an_ensemble_averages_the_probabilities_of_its_members(synthetic_raw, plans):  # noqa: F811
    label, geometry = read_label(synthetic_raw / "labelsTr" / "synth_004.nii.gz")
    image = label[None].astype(np.float32) * 10.0 + 5.0
    z = lambda v: ((np.array(v) - image.mean()) / image.std()).tolist()  # noqa: E731
    # Two models that disagree on where the classes lie in intensity.
    first = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity(z([5.0, 15.0, 25.0]))], ["0"])
    second = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity(z([5.0, 24.0, 14.0]))], ["0"])
    settings = PredictionSettings(mirror=False, save_probabilities=True)
    cpu = torch.device("cpu")
    a, b = (predict_case(m, image, geometry, settings, cpu) for m in (first, second))
    both = predict_case([first, second], image, geometry, settings, cpu)
    mean = (a.probabilities.astype(np.float32) + b.probabilities.astype(np.float32)) / 2
    assert np.allclose(both.probabilities.astype(np.float32), mean, atol=1e-3)
    assert np.abs(a.probabilities.astype(np.float32) - mean).max() > 0.4  # the members do disagree
    top_two = np.sort(mean, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 2e-3  # away from ties, which float16 rounding may break either way
    assert clear.mean() > 0.5
    assert np.array_equal(both.labels[clear], np.array([0, 1, 2])[mean.argmax(0)][clear])


def test_an_ensemble_of_models_with_other_labels_is_refused(synthetic_raw, plans):  # noqa: F811
    # Averaged channel by channel, the probabilities of a model of other classes would be mixed into these.
    import copy

    label, geometry = read_label(synthetic_raw / "labelsTr" / "synth_004.nii.gz")
    other = copy.deepcopy(plans)
    other.labels = {"background": 0, "liver": 1, "tumour": 2}
    first = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity([0.0, 1.0, 2.0])], ["0"])
    second = TrainedModel(other, "3d_fullres", "unet", [NearestIntensity([0.0, 1.0, 2.0])], ["0"])
    with pytest.raises(UsageError, match="the ensemble's models differ in labels or channels"):
        predict_case([first, second], label[None].astype(np.float32), geometry, PredictionSettings(),
                     torch.device("cpu"))


def test_ensemble_command_averages_prediction_folders_in_the_first_folders_geometry(tmp_path, capsys):
    # Two folders as `predict --save-probabilities` leaves them: CASE.npz beside CASE.nii.gz. The second's label
    # map lies elsewhere (another origin), so taking its geometry, or none, shows.
    import SimpleITK as sitk

    from autoseg.cli import main

    rng = np.random.default_rng(0)
    values = np.array([0, 2, 5])
    probabilities = {name: rng.dirichlet(np.ones(3), size=(3, 4, 5)).transpose(3, 0, 1, 2) for name in ("a", "b")}
    for name, origin in (("a", (10.0, -20.0, 30.0)), ("b", (0.0, 0.0, 0.0))):
        (tmp_path / name).mkdir()
        save_probability_file(tmp_path / name / "case_1.npz", probabilities[name], values.tolist())
        label = sitk.GetImageFromArray(values[probabilities[name].argmax(0)].astype(np.uint8))
        label.SetSpacing((0.8, 0.9, 2.5))
        label.SetOrigin(origin)
        label.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(label, str(tmp_path / name / "case_1.nii.gz"))
    (tmp_path / "b" / ".autoseg-tmp-host.99-x-case_9.npz").write_bytes(b"")  # what a killed predict leaves
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["ensemble", "-i", *folders, "-o", str(tmp_path / "ab"), "--save-probabilities"]) == 0
    assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["case_1.nii.gz", "case_1.npz"]
    stored = [np.load(tmp_path / name / "case_1.npz")["probabilities"].astype(np.float32) for name in ("a", "b")]
    expected = values[((stored[0] + stored[1]) / 2).argmax(0)]
    assert 0 < (expected != values[stored[0].argmax(0)]).sum()  # the ensemble differs from either member
    assert 0 < (expected != values[stored[1].argmax(0)]).sum()
    written = sitk.ReadImage(str(tmp_path / "ab" / "case_1.nii.gz"))
    first = sitk.ReadImage(str(tmp_path / "a" / "case_1.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(written), expected)
    assert (written.GetOrigin(), written.GetSpacing(), written.GetDirection()) == (
        first.GetOrigin(), first.GetSpacing(), first.GetDirection())
    mean = np.load(tmp_path / "ab" / "case_1.npz")["probabilities"].astype(np.float32)
    assert np.allclose(mean, (stored[0] + stored[1]) / 2, atol=1e-3)  # float16 on disk
    assert main(["ensemble", "-i", *folders, "-o", str(tmp_path / "ab")]) == 0  # done already: skipped
    assert "0 written, 1 already there" in capsys.readouterr().out

    # A case one folder lacks, a folder given twice, a postprocessing file that is none: refused, nothing written.
    save_probability_file(tmp_path / "a" / "case_2.npz", probabilities["a"], values.tolist())
    for arguments, message in (([*folders], f"{tmp_path / 'b'}: has no probability file for 1 case(s) the other "
                                            "folders have: case_2"),
                               ([folders[0], folders[0]], "a folder is given twice"),
                               ([*folders, "--postprocessing", folders[0] + "/case_1.npz"],
                                "--postprocessing takes an existing postprocessing.json")):
        assert main(["ensemble", "-i", *arguments, "-o", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
