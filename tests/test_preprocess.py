import numpy as np
import pytest
from scipy import ndimage

from autoseg.cli import main
from autoseg.dataset.check import read_case
from autoseg.dataset.spec import load_dataset_spec
from autoseg.fingerprint import compute_fingerprint
from autoseg.planning.planner import plan_dataset
from autoseg.preprocessing.crop import uncrop
from autoseg.preprocessing.preprocess import class_values, preprocess_arrays
from autoseg.preprocessing.resample import resample_image, resample_labels, resample_probabilities
from autoseg.preprocessing.store import list_finished_cases, load_arrays, load_properties


@pytest.fixture(scope="module")
def planned(synthetic_raw):
    spec = load_dataset_spec(synthetic_raw)
    return spec, plan_dataset(compute_fingerprint(synthetic_raw, 1, False), spec.labels)


def test_label_resampling_never_invents_values():
    labels = np.zeros((6, 20, 20), np.int16)
    labels[:, 5:10, 5:10] = 1
    labels[:, 10:15, 10:15] = 3
    for shape in ([6, 31, 27], [6, 9, 13], [11, 20, 20]):
        out = resample_labels(labels, shape, order=1, aniso_axis=0)
        assert list(out.shape) == shape
        assert set(np.unique(out)) <= {0, 1, 3}
        assert set(np.unique(out)) == {0, 1, 3}


def test_label_resampling_breaks_ties_towards_the_higher_label_as_nnunet():
    # Spacing doubled (8 voxels to 4): every output voxel lies midway between two inputs. nnU-Net
    # thresholds each label's interpolated mask at >= 0.5 in ascending order, so a tie goes to the
    # higher label: the one-voxel structure stays. The ignore label, -1 here, loses its tie with the
    # background (unlike nnU-Net's, the highest value there).
    labels = np.array([0, 0, 0, 1, 0, -1, -1, -1], np.int16).reshape(1, 1, 8)
    out = resample_labels(labels, [1, 1, 4], order=1)
    assert out.ravel().tolist() == [0, 1, 0, -1]


def test_resampling_equals_nnunets_skimage_calls():
    from skimage.transform import resize

    # nnU-Net resamples images with skimage's resize(order=3, mode="edge", anti_aliasing=False; clip=True,
    # its default, keeps the input's range) and each label's mask with order 1, thresholded at 0.5 in
    # ascending label order. With two labels our argmax over the interpolated masks is that rule (the two
    # masks sum to 1), up to float32 rounding where a voxel lies midway.
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.normal(0, 1, (10, 20, 15)), 1.5).astype(np.float32)
    for shape in ([7, 31, 22], [13, 11, 15]):
        expected = resize(image.astype(np.float64), shape, order=3, mode="edge", anti_aliasing=False)
        ours = resample_image(image[None], shape)[0]
        assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max(), shape
        labels = (ndimage.gaussian_filter(rng.random((10, 20, 15)), 2.0) > 0.5).astype(np.uint8)
        interpolated = resize(labels.astype(np.float64), shape, order=1, mode="edge", anti_aliasing=False)
        differ = resample_labels(labels, shape, order=1) != (interpolated >= 0.5)
        assert np.all(np.abs(interpolated[differ] - 0.5) < 1e-5), shape
    assert resample_image(image[None], [7, 31, 22]).min() >= image.min()  # the spline's overshoot is clipped


def test_preprocess_then_invert_gives_back_the_original_geometry_and_labels(planned):
    spec, plans = planned
    case = next(c for c in spec.cases if c.case_id == "synth_002")  # a case with a flipped direction
    loaded = read_case(case, spec)
    result = preprocess_arrays(loaded.image, loaded.label, loaded.geometry, plans, "3d_fullres")
    assert result.image.dtype == np.float32 and result.image.shape[1:] == result.seg.shape
    assert abs(float(result.image.mean())) < 0.2 and abs(float(result.image.std()) - 1) < 0.2
    # The inverse that prediction uses: one-hot -> resample back -> uncrop.
    one_hot = np.stack([(result.seg == k).astype(np.float32) for k in range(3)])
    back = resample_probabilities(one_hot, result.shape_after_crop, plans.configurations["3d_fullres"].anisotropic_axis)
    restored = uncrop(np.array(class_values(plans))[back.argmax(0)], result.crop_box, loaded.geometry.array_shape)
    assert list(restored.shape) == loaded.geometry.array_shape
    agreement = (restored == loaded.label).mean()
    assert agreement > 0.99


def test_plan_and_preprocess_resumes_and_skips_finished_cases(synthetic_raw, tmp_path, capsys):
    flags = [f"--raw={synthetic_raw.parent}", f"--preprocessed={tmp_path / 'pre'}", f"--results={tmp_path / 'res'}"]
    assert main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1"] + flags) == 0
    folder = next((tmp_path / "pre" / synthetic_raw.name).glob("3d_fullres_*"))
    cases = list_finished_cases(folder)
    assert len(cases) == 6
    before = (folder / f"{cases[0]}.npy").read_bytes()
    # Simulate an interrupted run: one case lost its properties (the last file written).
    (folder / f"{cases[1]}.json").unlink()
    capsys.readouterr()
    assert main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1"] + flags) == 0
    assert "1 case(s) preprocessed, 5 already done" in capsys.readouterr().out
    assert (folder / f"{cases[0]}.npy").read_bytes() == before
    props = load_properties(folder, cases[0])
    image, seg = load_arrays(folder, cases[0])
    assert list(image.shape[1:]) == props.shape_after_resampling == list(seg.shape)
    assert set(props.class_locations) == {"1", "2"}
    assert not list(folder.glob(".*tmp")), "no temporary file is left behind"


def test_nnunets_channel_names_choose_its_normalisations():
    import dataclasses
    from pathlib import Path

    from autoseg.fingerprint import load_fingerprint
    from autoseg.planning.normalization import plan_normalization
    from autoseg.planning.plans import ChannelNormalization
    from autoseg.preprocessing.normalize import normalize

    fingerprint = load_fingerprint(Path(__file__).parents[1] / "dataset_fingerprints" / "Dataset004_Hippocampus.json")
    names = ["rgb_to_0_1", "noNorm", "rescale_to_0_1", "MRI"]
    fingerprint = dataclasses.replace(fingerprint, channel_names=names,
                                      foreground_intensity=fingerprint.foreground_intensity * 4)
    assert [n.scheme for n in plan_normalization(fingerprint)] == ["rgb255", "none", "rescale01", "zscore"]
    # rgb_to_0_1 divides by 255 (nnU-Net's RGBTo01Normalization): a dark image stays dark, a colour keeps its value
    dark = np.array([[[[10.0, 51.0]]], [[[0.0, 3.0]]]], np.float32)
    out = normalize(dark, [ChannelNormalization("R", "rgb255"), ChannelNormalization("mask", "none")])
    assert out[0].ravel().tolist() == pytest.approx([10 / 255, 0.2]) and out[1].ravel().tolist() == [0.0, 3.0]


def test_each_normalisation_scheme_on_hand_computed_values():
    from autoseg.planning.plans import ChannelNormalization
    from autoseg.preprocessing.normalize import normalize

    def one(values, norm, mask=None):
        image = np.array(values, np.float32).reshape(1, 1, 1, -1)
        return normalize(image, [norm], None if mask is None else np.array(mask).reshape(1, 1, -1)).ravel().tolist()

    # CT: clipped to the dataset's foreground percentiles, then the dataset's (not the image's) mean and std.
    ct = ChannelNormalization("CT", "ct", clip_low=-100.0, clip_high=200.0, mean=50.0, std=10.0)
    assert one([-500, 0, 300], ct) == pytest.approx([-15.0, -5.0, 15.0])
    assert one([1, 3], ChannelNormalization("MRI", "zscore")) == pytest.approx([-1.0, 1.0])  # mean 2, std 1
    # Statistics of the masked voxels only ([2, 4]: mean 3, std 1); outside the mask 0, the normalised background.
    masked = one([0, 2, 4, 100], ChannelNormalization("MRI", "zscore_mask"), mask=[False, True, True, False])
    assert masked == pytest.approx([0.0, -1.0, 1.0, 0.0])
    assert one([2, 4, 6], ChannelNormalization("x", "rescale01")) == pytest.approx([0.0, 0.5, 1.0])
    assert one([7, 7], ChannelNormalization("MRI", "zscore")) == [0.0, 0.0]  # constant image: no division by 0


def test_a_store_follows_the_raw_dataset_and_training_refuses_one_of_another_plan(synthetic_raw, tmp_path, capsys):
    import json
    import os
    import shutil

    from tests.conftest import TRAIN_TINY, shrink_plan_to_tiny_unet

    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw / synthetic_raw.name)
    dataset = raw / synthetic_raw.name
    flags = [f"--raw={raw}", f"--preprocessed={tmp_path / 'pre'}", f"--results={tmp_path / 'res'}"]
    command = ["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1", "-a", "unet", *flags]
    assert main(command) == 0
    plans_file = tmp_path / "pre" / synthetic_raw.name / "plans.json"
    store = tmp_path / "pre" / synthetic_raw.name / json.loads(plans_file.read_text())[
        "configurations"]["3d_fullres"]["data_identifier"]
    cases = list_finished_cases(store)
    # A store written before the stamps existed takes the present ones instead of being redone; a dataset
    # moved elsewhere is not redone either (stamps are keyed by the path inside the dataset folder).
    properties = json.loads((store / f"{cases[2]}.json").read_text())
    del properties["source_stamps"]
    (store / f"{cases[2]}.json").write_text(json.dumps(properties))
    shutil.move(str(raw), str(tmp_path / "moved"))
    raw, dataset = tmp_path / "moved", tmp_path / "moved" / synthetic_raw.name
    flags[0] = f"--raw={raw}"
    command = ["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1", "-a", "unet", *flags]
    capsys.readouterr()
    assert main(command) == 0
    assert f"0 case(s) preprocessed, {len(cases)} already done" in capsys.readouterr().out
    assert json.loads((store / f"{cases[2]}.json").read_text())["source_stamps"]
    # A label corrected in place (same plan, same digest) is preprocessed again; a removed case leaves the store.
    label = dataset / "labelsTr" / f"{cases[0]}.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    for file in [dataset / "labelsTr" / f"{cases[1]}.nii.gz", *(dataset / "imagesTr").glob(f"{cases[1]}_*")]:
        file.unlink()
    data = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({**data, "numTraining": data["numTraining"] - 1}))
    capsys.readouterr()
    assert main(command) == 0
    assert f"1 case(s) preprocessed, {len(cases) - 2} already done" in capsys.readouterr().out
    assert list_finished_cases(store) == [c for c in cases if c != cases[1]]
    assert not list(store.glob(f"{cases[1]}*"))
    # A misspelt configuration is refused before the plan is rewritten.
    before = plans_file.stat().st_mtime_ns
    assert main([*command[:4], "3d_fulres", *command[5:]]) == 2
    assert "configuration '3d_fulres' is not planned" in capsys.readouterr().err
    assert plans_file.stat().st_mtime_ns == before
    # plans.json edited (another spacing) without preprocessing again: training refuses the store.
    shrink_plan_to_tiny_unet(plans_file)
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["spacing"][0] *= 2
    plans_file.write_text(json.dumps(plans))
    assert main([*TRAIN_TINY, *flags]) == 2
    assert "was preprocessed for another plan" in capsys.readouterr().err


def test_a_thick_sliced_case_is_not_interpolated_across_its_slices_under_a_near_isotropic_target(planned):
    """nnU-Net decides "separate z" per case: 5 mm slices brought to a 1 mm target take their slices
    (order 0 along z), where cubic interpolation across them would invent intermediate tissue."""
    import dataclasses

    from autoseg.io.images import Geometry

    _, plans = planned
    config = dataclasses.replace(plans.configuration("3d_fullres"), spacing=[1.0, 1.0, 1.0], anisotropic_axis=None)
    isotropic = dataclasses.replace(plans, configurations={"3d_fullres": config})
    image = np.where(np.arange(4)[:, None, None] % 2 == 0, 10.0, 100.0) * np.ones((4, 6, 6))
    geometry = Geometry(shape=[4, 6, 6], spacing=[1.0, 1.0, 5.0], origin=[0.0, 0.0, 0.0],
                        direction=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0])
    result = preprocess_arrays(image[None].astype(np.float32), None, geometry, isotropic, "3d_fullres")
    assert result.image.shape == (1, 20, 6, 6)
    assert len(np.unique(result.image.round(5))) == 2  # the two slice intensities, nothing in between


def test_a_2d_images_zero_hole_stays_in_its_nonzero_mask_and_ct_without_foreground_is_refused():
    import dataclasses
    from pathlib import Path

    from autoseg.errors import PlanError
    from autoseg.fingerprint import IntensityStats, load_fingerprint
    from autoseg.planning.normalization import plan_normalization
    from autoseg.preprocessing.crop import nonzero_mask

    ring = np.ones((1, 1, 5, 5), np.float32)
    ring[0, 0, 2, 2] = 0  # a dark pixel inside the picture, as in a dermoscopy image
    assert nonzero_mask(ring).all()
    fingerprint = load_fingerprint(Path(__file__).parents[1] / "dataset_fingerprints" / "Dataset004_Hippocampus.json")
    no_foreground = dataclasses.replace(fingerprint, channel_names=["CT"],
                                        foreground_intensity=[IntensityStats.of(np.zeros(0))])
    with pytest.raises(PlanError, match="'CT' is CT, but no training case has a labelled"):
        plan_normalization(no_foreground)
