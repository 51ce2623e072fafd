import shutil

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.dataset.spec import load_dataset_spec
from autoseg.errors import CheckpointError, UsageError
from autoseg.fingerprint import compute_fingerprint
from autoseg.inference.folder import predict_folder
from autoseg.inference.model import TrainedModel, load_state_dict, load_trained_model
from autoseg.inference.predictor import PredictionSettings
from autoseg.inference.sliding_window import predict_probabilities
from autoseg.io.images import read_image, read_label
from autoseg.networks.registry import build_network
from autoseg.planning.planner import plan_dataset
from autoseg.planning.plans import save_plans
from autoseg.preprocessing.preprocess import preprocess_arrays


class NearestIntensity(torch.nn.Module):
    """Logits that pick, per voxel, the class whose (normalised) intensity is nearest."""

    def __init__(self, centres):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x):
        return -1000.0 * (x - self.centres) ** 2


@pytest.fixture(scope="module")
def plans(synthetic_raw):
    spec = load_dataset_spec(synthetic_raw)
    return plan_dataset(compute_fingerprint(synthetic_raw, 1, False), spec.labels, architectures=["unet"])


def test_sliding_window_of_an_identity_network_returns_the_input():
    labels = torch.randint(0, 3, (13, 37, 29))
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(3, 0, 1, 2).float()
    identity = lambda x: x * 50.0  # noqa: E731 - logits whose softmax is the input one-hot
    for patch in ([8, 16, 16], [16, 16]):
        probabilities = predict_probabilities([identity], one_hot, patch, mirror=True)
        assert probabilities.shape == one_hot.shape
        assert torch.allclose(probabilities, one_hot, atol=1e-4)


def test_known_mask_comes_back_voxel_identical_in_the_original_geometry(synthetic_raw, plans, tmp_path):
    """Images whose intensity is their label map: the written prediction must equal the label exactly."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    from autoseg.io.images import write_image

    cases = ["synth_002", "synth_005"]  # flipped and rotated directions, 3 mm slices
    for case in cases:
        label, geometry = read_label(synthetic_raw / "labelsTr" / f"{case}.nii.gz")
        write_image((label.astype(np.float32) * 10.0 + 5.0), inputs / f"{case}_0000.nii.gz", geometry)
    image, geometry = read_image(inputs / f"{cases[0]}_0000.nii.gz")
    pre = preprocess_arrays(image, None, geometry, plans, "3d_fullres")
    raw_values = np.array([5.0, 15.0, 25.0])
    original = image[0]
    centres = (raw_values - original.mean()) / original.std()
    model = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity(centres.tolist())], ["0"])
    assert pre.image.shape[0] == 1
    # z-score statistics differ per case; make each case use its own centres by predicting one at a time.
    for case in cases:
        image, _ = read_image(inputs / f"{case}_0000.nii.gz")
        model.networks = [NearestIntensity(((raw_values - image[0].mean()) / image[0].std()).tolist())]
        one = tmp_path / f"one_{case}"
        one.mkdir()
        shutil.copy(inputs / f"{case}_0000.nii.gz", one)
        predict_folder(model, one, tmp_path / "out", PredictionSettings(mirror=True), torch.device("cpu"))
        predicted, predicted_geometry = read_label(tmp_path / "out" / f"{case}.nii.gz")
        truth, truth_geometry = read_label(synthetic_raw / "labelsTr" / f"{case}.nii.gz")
        assert predicted_geometry == truth_geometry
        assert np.array_equal(predicted, truth)


def _trained_model(results, plans, dataset):
    fold = results / dataset / "3d_fullres__unet" / "fold_0"
    fold.mkdir(parents=True)
    arch = plans.architecture("3d_fullres")
    torch.manual_seed(0)
    network = build_network(arch, 1, 3, 3, deep_supervision=True)
    torch.save({"model": network.state_dict()}, fold / "checkpoint_final.pt")
    save_plans(plans, fold / "plans.json")
    return fold


def test_predict_command_skips_an_unreadable_case_writes_the_rest_and_exits_2(synthetic_raw, plans, tmp_path, capsys):
    _trained_model(tmp_path / "res", plans, synthetic_raw.name)
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_raw / "imagesTs", inputs)
    (inputs / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    flags = [f"--raw={synthetic_raw.parent}", f"--preprocessed={tmp_path / 'pre'}", f"--results={tmp_path / 'res'}"]
    code = main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "999", "-c", "3d_fullres",
                 "-f", "0", "--disable-tta"] + flags)
    err = capsys.readouterr().err
    assert code == 2
    assert "broken_0000.nii.gz" in err and "skipped" in err
    for case in ("synth_006", "synth_007"):
        label, geometry = read_label(tmp_path / "out" / f"{case}.nii.gz")
        _, image_geometry = read_image(inputs / f"{case}_0000.nii.gz")
        assert geometry == image_geometry and list(label.shape) == image_geometry.shape
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    # Re-running skips what is there.
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "999", "-c", "3d_fullres",
                 "-f", "0", "--disable-tta"] + flags) == 2
    assert "0 written, 2 already there, 1 failed" in capsys.readouterr().out


def test_output_folder_equal_to_input_is_refused(synthetic_raw, plans, tmp_path, capsys):
    _trained_model(tmp_path / "res", plans, synthetic_raw.name)
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_raw / "imagesTs", inputs)
    code = main(["predict", "-i", str(inputs), "-o", str(inputs), "-d", "999", "-c", "3d_fullres", "-f", "0",
                 f"--raw={synthetic_raw.parent}", f"--results={tmp_path / 'res'}", f"--preprocessed={tmp_path}"])
    assert code == 2 and "must differ from the input folder" in capsys.readouterr().err


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", ["pickled object", "truncated", "bare tensor"])
def test_tampered_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / "checkpoint_final.pt"
    if content == "pickled object":
        torch.save({"model": Evil()}, path)
    elif content == "truncated":
        torch.save({"model": {"w": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="checkpoint_final.pt"):
        load_state_dict(path)


class RunsOutOfMemory(NearestIntensity):
    """Raises torch's out-of-memory error (what CUDA raises) on its first ``failures`` calls."""

    def __init__(self, centres, failures: int):
        super().__init__(centres)
        self.failures = failures

    def forward(self, x):
        if self.failures > 0:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.00 GiB")
        return super().forward(x)


def _intensity_cases(synthetic_raw, folder, cases):
    """Images whose intensity is their label map (label x 10 + 5), and the normalised class centres of the last."""
    from autoseg.io.images import write_image

    folder.mkdir()
    for case in cases:
        label, geometry = read_label(synthetic_raw / "labelsTr" / f"{case}.nii.gz")
        write_image(label.astype(np.float32) * 10.0 + 5.0, folder / f"{case}_0000.nii.gz", geometry)
    image, _ = read_image(folder / f"{cases[-1]}_0000.nii.gz")
    return ((np.array([5.0, 15.0, 25.0]) - image[0].mean()) / image[0].std()).tolist()


def test_out_of_memory_predicts_again_with_the_sums_in_host_memory(synthetic_raw, plans, tmp_path, capfd):
    centres = _intensity_cases(synthetic_raw, tmp_path / "in", ["synth_002"])
    model = TrainedModel(plans, "3d_fullres", "unet", [RunsOutOfMemory(centres, failures=1)], ["0"])
    result = predict_folder(model, tmp_path / "in", tmp_path / "out", PredictionSettings(mirror=False),
                            torch.device("cpu"), progress=False)
    assert result.written == ["synth_002"] and not result.failed
    assert "again with the image and the sums in host memory" in capfd.readouterr().err
    truth, _ = read_label(synthetic_raw / "labelsTr" / "synth_002.nii.gz")
    assert np.array_equal(read_label(tmp_path / "out" / "synth_002.nii.gz")[0], truth)


def test_a_case_that_runs_out_of_memory_twice_is_skipped_and_named_and_the_rest_predicted(synthetic_raw, plans,
                                                                                           tmp_path):
    centres = _intensity_cases(synthetic_raw, tmp_path / "in", ["synth_002", "synth_005"])
    model = TrainedModel(plans, "3d_fullres", "unet", [RunsOutOfMemory(centres, failures=2)], ["0"])
    result = predict_folder(model, tmp_path / "in", tmp_path / "out", PredictionSettings(mirror=False),
                            torch.device("cpu"), progress=False)
    assert result.written == ["synth_005"] and len(result.failed) == 1
    assert result.failed[0].startswith(str(tmp_path / "in" / "synth_002_0000.nii.gz") + ": out of cpu memory even")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["synth_005.nii.gz"]
    truth, _ = read_label(synthetic_raw / "labelsTr" / "synth_005.nii.gz")
    assert np.array_equal(read_label(tmp_path / "out" / "synth_005.nii.gz")[0], truth)


def test_plain_names_ending_in_four_digits_are_cases_of_a_one_channel_model(tmp_path, capsys):
    from autoseg.inference.folder import list_input_cases

    for name in ("liver_0001.nii.gz", "liver_0002.nii.gz", "plain.nii.gz", "c_0000.nii.gz", "two_0000.nrrd",
                 "two_0001.nrrd"):
        (tmp_path / name).write_bytes(b"")
    one_channel = {case.case_id: [f.name for f in case.files] for case in list_input_cases(tmp_path, 1)}
    assert one_channel == {"c": ["c_0000.nii.gz"], "liver_0001": ["liver_0001.nii.gz"],
                           "liver_0002": ["liver_0002.nii.gz"], "plain": ["plain.nii.gz"],
                           "two": ["two_0000.nrrd", "two_0001.nrrd"]}  # _0000 present: channels (refused later)
    two_channels = {case.case_id: [f.name for f in case.files] for case in list_input_cases(tmp_path, 2)}
    assert two_channels["two"] == ["two_0000.nrrd", "two_0001.nrrd"] and two_channels["liver"] == [
        "liver_0001.nii.gz", "liver_0002.nii.gz"]  # refused when read: no _0000
    assert "1 file(s) without a channel suffix (_0000 ...) passed over" in capsys.readouterr().err  # plain.nii.gz
    (tmp_path / "c.nii.gz").write_bytes(b"")  # beside c_0000.nii.gz: the same case and channel twice
    with pytest.raises(UsageError, match="two files for channel 0 of case c: c.nii.gz and c_0000.nii.gz"):
        list_input_cases(tmp_path, 1)


def test_a_plain_name_ending_in_four_digits_is_read_and_predicted(synthetic_raw, plans, tmp_path):
    centres = _intensity_cases(synthetic_raw, tmp_path / "src", ["synth_002"])
    (tmp_path / "in").mkdir()
    (tmp_path / "src" / "synth_002_0000.nii.gz").rename(tmp_path / "in" / "liver_0001.nii.gz")
    model = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity(centres)], ["0"])
    result = predict_folder(model, tmp_path / "in", tmp_path / "out", PredictionSettings(mirror=False),
                            torch.device("cpu"), progress=False)
    assert result.written == ["liver_0001"] and not result.failed
    truth, _ = read_label(synthetic_raw / "labelsTr" / "synth_002.nii.gz")
    assert np.array_equal(read_label(tmp_path / "out" / "liver_0001.nii.gz")[0], truth)


class NearestIntensity2D(NearestIntensity):
    """NearestIntensity for 2D windows, counting the slices it is given."""

    def __init__(self, centres):
        super().__init__(centres)
        self.centres = self.centres.view(1, -1, 1, 1)
        self.slices_seen = 0

    def forward(self, x):
        assert x.dim() == 4, "a 2D network gets (batch, channels, Y, X) windows"
        self.slices_seen += x.shape[0]
        return super().forward(x)


def _thick_axis_last_dataset(synthetic_raw, root):
    """The synthetic dataset with each array turned (z, y, x) -> (y, x, z): the 3 mm slices are now along
    array axis 2 (ITK's x), as in a sagittal series; images are their label map (label x 10 + 5)."""
    import json

    from tests.conftest import write_nifti

    dataset = root / synthetic_raw.name
    for case in sorted(p.name[:-len(".nii.gz")] for p in (synthetic_raw / "labelsTr").iterdir()):
        label, _ = read_label(synthetic_raw / "labelsTr" / f"{case}.nii.gz")
        turned = np.ascontiguousarray(np.transpose(label, (1, 2, 0)))
        write_nifti(dataset / "labelsTr" / f"{case}.nii.gz", turned.astype(np.uint8), spacing=(3.0, 1.0, 1.0))
        write_nifti(dataset / "imagesTr" / f"{case}_0000.nii.gz", turned.astype(np.float32) * 10.0 + 5.0,
                    spacing=(3.0, 1.0, 1.0))
    spec = json.loads((synthetic_raw / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({**spec, "numTraining": len(list((dataset / "labelsTr").iterdir()))}))
    return dataset


def test_a_2d_configuration_slices_across_the_thick_axis_wherever_it_lies_and_maps_back(synthetic_raw, tmp_path):
    # nnU-Net's transpose_forward: the 2D network sees the fine 1x1 mm planes, not 3x1 mm strips, and the
    # prediction comes back in the input's own array order and geometry.
    dataset = _thick_axis_last_dataset(synthetic_raw, tmp_path / "raw")
    plans = plan_dataset(compute_fingerprint(dataset, 1, False), load_dataset_spec(dataset).labels,
                         architectures=["unet"])
    config = plans.configurations["2d"]
    assert config.slice_axis == 2 and config.spacing == [1.0, 1.0]
    case = "synth_002"
    image, geometry = read_image(dataset / "imagesTr" / f"{case}_0000.nii.gz")
    truth, truth_geometry = read_label(dataset / "labelsTr" / f"{case}.nii.gz")
    pre = preprocess_arrays(image, truth, geometry, plans, "2d")  # nothing to crop or resample here
    assert pre.seg.shape == (truth.shape[2], truth.shape[0], truth.shape[1])  # the thick axis's slices first
    assert all(np.array_equal(pre.seg[k], truth[:, :, k]) for k in range(truth.shape[2]))
    patch = plans.architecture("2d").patch_size
    assert all(p >= n for p, n in zip(patch, image.shape[1:3])), "one window per slice, for the count below"
    (tmp_path / "in").mkdir()
    shutil.copy(dataset / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "in")
    network = NearestIntensity2D(((np.array([5.0, 15.0, 25.0]) - image[0].mean()) / image[0].std()).tolist())
    model = TrainedModel(plans, "2d", "unet", [network], ["0"])
    result = predict_folder(model, tmp_path / "in", tmp_path / "out", PredictionSettings(mirror=False),
                            torch.device("cpu"), progress=False)
    assert result.written == [case]
    assert network.slices_seen == image.shape[3]  # one window per 3 mm slice (axis 2), none across
    predicted, predicted_geometry = read_label(tmp_path / "out" / f"{case}.nii.gz")
    assert predicted_geometry == truth_geometry
    assert np.array_equal(predicted, truth)
    # A 2D image has no axis 2 to slice across (its placeholder axis 0 would be resampled into ~999 slices).
    from tests.conftest import write_nifti

    write_nifti(tmp_path / "flat" / "flat_0000.nii.gz", np.full((30, 20), 5.0, np.float32), spacing=(1.0, 1.0))
    result = predict_folder(model, tmp_path / "flat", tmp_path / "out", PredictionSettings(mirror=False),
                            torch.device("cpu"), progress=False)
    assert result.written == [] and "which slices volumes across array axis 2" in result.failed[0]


def test_only_a_finished_fold_predicts_unless_another_checkpoint_is_named(plans, tmp_path):
    # nnU-Net's rule: a fold still training (or killed) has best/latest checkpoints only, and is not used unasked.
    fold = _trained_model(tmp_path / "results", plans, "Dataset999_Synthetic")
    (fold / "checkpoint_final.pt").rename(fold / "checkpoint_best.pt")
    with pytest.raises(CheckpointError, match=r"training has not finished \(no checkpoint_final.pt; "
                                              r"checkpoint_best.pt there\).*--checkpoint"):
        load_trained_model(fold.parent, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    model = load_trained_model(fold.parent, ["0"], "3d_fullres", "unet", torch.device("cpu"),
                               checkpoint_name="checkpoint_best.pt")
    assert len(model.networks) == 1


def test_a_fold_trained_on_another_plan_is_refused_by_name(plans, tmp_path):
    """Re-planned (new preprocessing, same topology), then only fold 0 retrained: fold 1's weights still load,
    so without the check the two would be averaged, fold 1 fed data preprocessed for the new plan."""
    fold_0 = _trained_model(tmp_path / "results", plans, "Dataset999_Synthetic")
    arch = plans.architecture("3d_fullres")
    trained_on = {"configuration": "3d_fullres", "architecture": "unet", "patch_size": list(arch.patch_size),
                  "data_identifier": plans.configuration("3d_fullres").data_identifier, "num_classes": 3}
    weights = load_state_dict(fold_0 / "checkpoint_final.pt")
    torch.save({"model": weights, "plan": trained_on}, fold_0 / "checkpoint_final.pt")
    fold_1 = fold_0.parent / "fold_1"
    shutil.copytree(fold_0, fold_1)
    torch.save({"model": weights, "plan": {**trained_on, "data_identifier": "3d_fullres_0ld0ld00"}},
               fold_1 / "checkpoint_final.pt")
    assert len(load_trained_model(fold_0.parent, ["0"], "3d_fullres", "unet", torch.device("cpu")).networks) == 1
    with pytest.raises(CheckpointError, match=r"fold_1/checkpoint_final.pt.*another plan .*data_identifier: "
                                              r"3d_fullres_0ld0ld00 there"):
        load_trained_model(fold_0.parent, ["0", "1"], "3d_fullres", "unet", torch.device("cpu"))


def test_a_2d_image_given_to_a_3d_model_is_refused_not_stretched_to_999_slices(plans, tmp_path):
    from tests.conftest import write_nifti

    write_nifti(tmp_path / "in" / "flat_0000.nii.gz", np.full((40, 30), 100.0, dtype=np.float32), spacing=(1.0, 1.0))
    model = TrainedModel(plans, "3d_fullres", "unet", [NearestIntensity([0.0, 1.0, 2.0])], ["0"])
    result = predict_folder(model, tmp_path / "in", tmp_path / "out", PredictionSettings(mirror=False),
                            torch.device("cpu"), progress=False)
    assert result.written == [] and len(result.failed) == 1
    assert result.failed[0] == (f"{tmp_path / 'in' / 'flat_0000.nii.gz'}: a 2D image (40 x 30) cannot be predicted "
                                "by the 3D configuration 3d_fullres; give a 3D image, or a model of 2D images")
