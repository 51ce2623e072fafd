"""Bad datasets: every problem is reported, naming the file, and nothing is written."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.dataset.check import check_dataset
from autoseg.dataset.spec import load_dataset_spec
from autoseg.errors import DatasetError
from tests.conftest import edit_json, write_nifti


def _label(root, case="synth_000"):
    return root / "labelsTr" / f"{case}.nii.gz"


def _image(root, case="synth_000"):
    return root / "imagesTr" / f"{case}_0000.nii.gz"


def _rewrite(path, change):
    image = sitk.ReadImage(str(path))
    array = change(sitk.GetArrayFromImage(image))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image) if array.shape == sitk.GetArrayFromImage(image).shape else None
    if array.shape != sitk.GetArrayFromImage(image).shape:
        out.SetSpacing(image.GetSpacing())
        out.SetOrigin(image.GetOrigin())
        out.SetDirection(image.GetDirection())
    sitk.WriteImage(out, str(path))


def _set(path, **geometry):
    image = sitk.ReadImage(str(path))
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    sitk.WriteImage(image, str(path))


BREAKAGES = {
    "missing channel": (lambda r: _image(r).unlink(), "label has no image"),
    "label without image": (lambda r: _image(r, "synth_001").unlink(), "synth_001.nii.gz: label has no image"),
    "image without label": (lambda r: _label(r, "synth_002").unlink(), "synth_002_0000.nii.gz: image has no label"),
    "unknown label value": (lambda r: _rewrite(_label(r), lambda a: np.where(a == 2, 7, a).astype(a.dtype)),
                            "label values [7] are not in dataset.json"),
    "NaN intensities": (lambda r: _rewrite(_image(r), lambda a: np.where(a > 150, np.nan, a).astype(a.dtype)),
                        "NaN or Inf"),
    "shape mismatch": (lambda r: _rewrite(_image(r), lambda a: a[:-1]), "shape"),
    "spacing mismatch": (lambda r: _set(_image(r), Spacing=(1.0, 1.0, 2.0)), "spacing"),
    "origin mismatch": (lambda r: _set(_image(r), Origin=(500.0, 0.0, 0.0)), "origin"),
    "direction mismatch": (lambda r: _set(_image(r), Direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
    "empty file": (lambda r: _image(r).write_bytes(b""), "file is empty"),
    "wrong magic bytes": (lambda r: _image(r).write_bytes(b"GIF89a" * 100), "cannot be read as an image"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_bad_input_gets_one_clear_line_exit_2_and_nothing_written(dataset_copy, tmp_path, capsys, breakage):
    damage, message = BREAKAGES[breakage]
    damage(dataset_copy)
    preprocessed = tmp_path / "pre"
    code = main(["plan-and-preprocess", "-d", dataset_copy.name, f"--raw={dataset_copy.parent}",
                 f"--preprocessed={preprocessed}", f"--results={tmp_path / 'res'}", "-np", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not preprocessed.exists(), "nothing may be written for a dataset that fails its check"


def test_all_problems_are_reported_not_only_the_first(dataset_copy):
    _label(dataset_copy, "synth_002").unlink()
    _set(_image(dataset_copy, "synth_003"), Spacing=(1.0, 1.0, 2.0))
    _rewrite(_label(dataset_copy, "synth_004"), lambda a: np.where(a == 2, 9, a).astype(a.dtype))
    problems = check_dataset(dataset_copy, num_processes=1, progress=False)
    joined = "\n".join(problems)
    assert len(problems) >= 4  # three cases plus numTraining
    assert "synth_002_0000" in joined and "synth_003_0000" in joined and "synth_004.nii.gz" in joined
    assert "numTraining is 6 but 5" in joined


@pytest.mark.parametrize("change, message", [
    (lambda p: p.write_text("{not json"), "invalid JSON"),
    (lambda p: edit_json(p, labels={"organ": 1}), "must contain \"background\": 0"),
    (lambda p: edit_json(p, labels={"background": 0, "a": "one"}), "must be an integer"),
    (lambda p: edit_json(p, labels={"background": 0, "a": 1, "b": 1}), "the same value 1"),
    (lambda p: edit_json(p, channel_names=["MRI"]), "channel_names"),
    (lambda p: edit_json(p, file_ending="nii"), "file_ending"),
    (lambda p: edit_json(p, numTraining="six"), "numTraining"),
    (lambda p: edit_json(p, dataset={"x": {"images": ["../../etc/passwd"], "label": "labelsTr/x.nii.gz"}}),
     "leaves the dataset folder"),
])
def test_dataset_json_problems_name_the_file_and_the_key(dataset_copy, change, message):
    change(dataset_copy / "dataset.json")
    with pytest.raises(DatasetError, match="dataset.json") as info:
        load_dataset_spec(dataset_copy)
    assert message in str(info.value)


def test_missing_key_is_named(dataset_copy):
    data = json.loads((dataset_copy / "dataset.json").read_text())
    del data["labels"]
    (dataset_copy / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="missing key 'labels'"):
        load_dataset_spec(dataset_copy)


def test_file_ending_that_matches_nothing_is_a_problem(dataset_copy):
    edit_json(dataset_copy / "dataset.json", file_ending=".nrrd")
    problems = check_dataset(dataset_copy, num_processes=1, progress=False)
    assert any("no file matches" in p for p in problems)


def test_non_contiguous_labels_are_accepted(tmp_path):
    root = tmp_path / "Dataset001_Gaps"
    label = np.zeros((4, 8, 8), np.uint8)
    label[1:3, 2:5, 2:5] = 4
    write_nifti(root / "imagesTr" / "a_0000.nii.gz", np.random.default_rng(0).random((4, 8, 8)).astype(np.float32))
    write_nifti(root / "labelsTr" / "a.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "tumour": 4}, "numTraining": 1}))
    assert check_dataset(root, num_processes=1, progress=False) == []
    assert load_dataset_spec(root).class_values == [0, 4]


def test_paths_with_spaces_and_non_ascii_work(synthetic_raw, tmp_path):
    import shutil

    raw = tmp_path / "données brutes"
    shutil.copytree(synthetic_raw, raw / synthetic_raw.name)
    assert check_dataset(raw / synthetic_raw.name, num_processes=1, progress=False) == []
