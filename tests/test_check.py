"""Bad datasets: every problem is reported, naming the file, and nothing is written."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.dataset.check import check_dataset
from autoseg.dataset.spec import load_dataset_spec
from tests.conftest import edit_json, write_nifti
from tests.faults import (FILE_FAULTS, INTENSITY_FAULTS, LABEL_FAULTS, assert_refused, files_under, needs_permissions,
                          run_cli)


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


def _without_key(path, key):
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))


def _dataset_json(change):
    return lambda root: change(root / "dataset.json")


def _second_channel_missing(root):
    for image in (root / "imagesTr").glob("*_0000.nii.gz"):
        if image.name != "synth_000_0000.nii.gz":
            shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))
    edit_json(root / "dataset.json", channel_names={"0": "T1", "1": "T2"})


def _second_channel_skipped(root):  # synth_000's second channel numbered _0002: it would be read as channel 1
    for image in (root / "imagesTr").glob("*_0000.nii.gz"):
        number = "_0002" if image.name == "synth_000_0000.nii.gz" else "_0001"
        shutil.copy(image, image.with_name(image.name.replace("_0000", number)))
    edit_json(root / "dataset.json", channel_names={"0": "T1", "1": "T2"})


IMAGE, LABEL, DATASET_JSON = "synth_000_0000.nii.gz", "synth_000.nii.gz", "dataset.json"
# name -> (damage(dataset folder), file the error line names, problem in words)
BREAKAGES = {
    **{f"image: {name}": (lambda r, d=damage: d(_image(r)), IMAGE, problem)
       for name, (damage, problem) in {**FILE_FAULTS, **INTENSITY_FAULTS}.items()},
    **{f"label: {name}": (lambda r, d=damage: d(_label(r)), LABEL, problem)
       for name, (damage, problem) in {**LABEL_FAULTS, **{k: FILE_FAULTS[k] for k in (
           "truncated gzip", "wrong magic bytes", "empty file", "4D image", "no read permission")}}.items()},
    "missing channel": (_second_channel_missing, IMAGE, "has 1 channel(s), dataset.json names 2"),
    "skipped channel number": (_second_channel_skipped, IMAGE, "_0001 is missing"),
    "dataset.json: ignore inside a region": (
        _dataset_json(lambda p: edit_json(p, labels={"background": 0, "whole": [1, 2], "core": [2], "ignore": 2},
                                          regions_class_order=[1, 2])), DATASET_JSON, "highest value"),
    "dataset.json: regions_class_order value in no region": (
        _dataset_json(lambda p: edit_json(p, labels={"background": 0, "whole": [1, 2], "core": 2},
                                          regions_class_order=[1, 4])), DATASET_JSON, "regions_class_order"),
    "dataset.json: a channel number twice": (_dataset_json(lambda p: edit_json(p, channel_names={"0": "T1", "00": "T2"})),
                                             DATASET_JSON, "each once"),
    "label without image": (lambda r: _image(r, "synth_001").unlink(), "synth_001.nii.gz", "label has no image"),
    "image without label": (lambda r: _label(r, "synth_002").unlink(), "synth_002_0000.nii.gz", "image has no label"),
    "shape mismatch": (lambda r: _rewrite(_image(r), lambda a: a[:-1]), IMAGE, "shape"),
    "spacing mismatch": (lambda r: _set(_image(r), Spacing=(1.0, 1.0, 2.0)), IMAGE, "spacing"),
    "origin mismatch": (lambda r: _set(_image(r), Origin=(500.0, 0.0, 0.0)), IMAGE, "origin"),
    "direction mismatch": (lambda r: _set(_image(r), Direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), IMAGE, "direction"),
    "dataset.json: invalid JSON": (_dataset_json(lambda p: p.write_text("{not json")), DATASET_JSON, "invalid JSON"),
    "dataset.json: missing key": (_dataset_json(lambda p: _without_key(p, "labels")), DATASET_JSON,
                                  "missing key 'labels'"),
    "dataset.json: no background": (_dataset_json(lambda p: edit_json(p, labels={"organ": 1})), DATASET_JSON,
                                    "must contain \"background\": 0"),
    "dataset.json: label of wrong type": (_dataset_json(lambda p: edit_json(p, labels={"background": 0, "a": "one"})),
                                          DATASET_JSON, "must be an integer"),
    "dataset.json: duplicate label value": (
        _dataset_json(lambda p: edit_json(p, labels={"background": 0, "a": 1, "b": 1})), DATASET_JSON,
        "the same value 1"),
    "dataset.json: channel_names of wrong type": (_dataset_json(lambda p: edit_json(p, channel_names=["MRI"])),
                                                  DATASET_JSON, "channel_names"),
    "dataset.json: numTraining of wrong type": (_dataset_json(lambda p: edit_json(p, numTraining="six")),
                                                DATASET_JSON, "numTraining"),
    "dataset.json: file_ending not a format": (_dataset_json(lambda p: edit_json(p, file_ending="nii")), DATASET_JSON,
                                               "file_ending"),
    "dataset.json: file_ending that matches nothing": (_dataset_json(lambda p: edit_json(p, file_ending=".nrrd")),
                                                       "imagesTr", "no file matches"),
    "dataset.json: path escapes the dataset folder": (
        _dataset_json(lambda p: edit_json(p, dataset={"x": {"images": ["../../etc/passwd"], "label": "labelsTr/x.nii.gz"}})),
        DATASET_JSON, "path '../../etc/passwd' leaves the dataset folder"),
}


@pytest.mark.parametrize("command", ["check", "plan-and-preprocess"])
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_bad_input_gets_one_clear_line_exit_2_and_nothing_written(dataset_copy, tmp_path, capsys, command,
                                                                        breakage):
    damage, file, problem = BREAKAGES[breakage]
    damage(dataset_copy)
    roots = [tmp_path / "pre", tmp_path / "res"]
    before = files_under(dataset_copy.parent, *roots)
    with needs_permissions(breakage):
        outcome = run_cli([command, "-d", dataset_copy.name, f"--raw={dataset_copy.parent}", f"--preprocessed={roots[0]}",
                           f"--results={roots[1]}", "-np", "1"], capsys)
    assert_refused(outcome, file, problem)
    assert files_under(dataset_copy.parent, *roots) == before, "nothing may be written for a dataset that fails"
    assert not roots[0].exists()


def test_all_problems_are_reported_not_only_the_first(dataset_copy):
    _label(dataset_copy, "synth_002").unlink()
    _set(_image(dataset_copy, "synth_003"), Spacing=(1.0, 1.0, 2.0))
    _rewrite(_label(dataset_copy, "synth_004"), lambda a: np.where(a == 2, 9, a).astype(a.dtype))
    problems = check_dataset(dataset_copy, num_processes=1, progress=False)
    joined = "\n".join(problems)
    assert len(problems) >= 4  # three cases plus numTraining
    assert "synth_002_0000" in joined and "synth_003_0000" in joined and "synth_004.nii.gz" in joined
    assert "numTraining is 6 but 5" in joined


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
    raw = tmp_path / "données brutes"
    shutil.copytree(synthetic_raw, raw / synthetic_raw.name)
    assert check_dataset(raw / synthetic_raw.name, num_processes=1, progress=False) == []
