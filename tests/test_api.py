"""autoseg.Segmenter: every input kind gives what `autoseg predict` wrote, with the input's geometry."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import SimpleITK as sitk

import autoseg
from autoseg.cli import main
from autoseg.errors import UsageError

README = Path(__file__).resolve().parents[1] / "README.md"
CASES = ("synth_006", "synth_007")  # the synthetic test cases; the pipeline predicted them without mirroring


@pytest.fixture(scope="module")
def model_package(pipeline, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("api") / "model.zip"
    assert main(["export", "-d", "999", "-c", "3d_fullres", "-f", "0", "-o", str(target), *pipeline.flags]) == 0
    return target


@pytest.fixture(scope="module")
def segmenter(model_package):
    return autoseg.Segmenter.load(model_package, device="cpu", tta=False, threads=1)


def _cli_output(pipeline, case):
    return pipeline.predictions / f"{case}.nii.gz"


@pytest.mark.parametrize("case", CASES)
def test_each_input_kind_returns_the_cli_output_with_the_input_geometry(pipeline, segmenter, case):
    image_file = pipeline.dataset / "imagesTs" / f"{case}_0000.nii.gz"
    written = sitk.ReadImage(str(_cli_output(pipeline, case)))
    expected = sitk.GetArrayFromImage(written)
    assert expected.any(), "a prediction with foreground makes the comparison mean something"

    image = sitk.ReadImage(str(image_file))
    for result in (segmenter.predict(image), segmenter.predict(image_file), segmenter.predict([str(image_file)])):
        assert isinstance(result, sitk.Image)
        assert np.array_equal(sitk.GetArrayFromImage(result), expected)
        assert result.GetPixelID() == written.GetPixelID()
        assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()
        assert result.GetDirection() == image.GetDirection()

    loaded = nib.load(str(image_file))
    result = segmenter.predict(loaded)
    written_nib = nib.load(str(_cli_output(pipeline, case)))
    assert isinstance(result, nib.Nifti1Image)
    assert np.array_equal(np.asarray(result.dataobj), np.asarray(written_nib.dataobj))
    assert np.array_equal(result.affine, loaded.affine) and result.get_data_dtype() == written_nib.get_data_dtype()

    array = sitk.GetArrayFromImage(image)
    result = segmenter.predict(array, spacing=image.GetSpacing()[::-1], origin=image.GetOrigin(),
                               direction=image.GetDirection())
    assert isinstance(result, np.ndarray) and result.shape == array.shape
    assert np.array_equal(result, expected)


def test_probabilities_are_what_save_probabilities_writes(pipeline, model_package, segmenter, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(pipeline.dataset / "imagesTs" / f"{CASES[0]}_0000.nii.gz", inputs)
    assert main(["predict", "-m", str(model_package), "-i", str(inputs), "-o",
                 str(tmp_path / "out"), "--disable-tta", "--save-probabilities"]) == 0
    with np.load(tmp_path / "out" / f"{CASES[0]}.npz") as stored:
        expected, values = stored["probabilities"], stored["label_values"].tolist()
    probabilities = segmenter.predict_probabilities(sitk.ReadImage(str(inputs / f"{CASES[0]}_0000.nii.gz")))
    assert segmenter.label_values == values
    assert probabilities.shape == expected.shape and np.array_equal(probabilities, expected)
    assert np.allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=1e-2)


def test_a_results_folder_loads_like_its_package(pipeline, segmenter, tmp_path):
    # Its finished folds, as nnU-Net finds them: a fold still training (best/latest only) is left out, and so
    # are fold_all and a renamed copy, though both hold a final checkpoint (fold_all was taken into the
    # ensemble until nnU-Net's rule was followed).
    import shutil

    model = tmp_path / pipeline.fold.parent.name
    shutil.copytree(pipeline.fold.parent, model)
    shutil.copytree(pipeline.fold, model / "fold_1")
    (model / "fold_1" / "checkpoint_final.pt").rename(model / "fold_1" / "checkpoint_best.pt")
    shutil.copytree(pipeline.fold, model / "fold_all")
    shutil.copytree(pipeline.fold, model / f"{pipeline.fold.name}_old")
    from_folder = autoseg.Segmenter.load(model, tta=False)
    assert from_folder.models[0].folds == [pipeline.fold.name[len("fold_"):]]
    image = sitk.ReadImage(str(pipeline.dataset / "imagesTs" / f"{CASES[1]}_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(from_folder.predict(image)),
                          sitk.GetArrayFromImage(segmenter.predict(image)))


def test_a_machine_holding_only_the_results_predicts_by_dataset_id(pipeline, tmp_path, capsys):
    # nnU-Net finds a dataset id under its results too ("no dataset with id 999" here before); without the
    # plan, the one trained model is taken (it was 3d_fullres__unet, guessed), and two are named, not guessed.
    model = pipeline.fold.parent.name
    results = tmp_path / "results"
    shutil.copytree(pipeline.fold.parent, results / pipeline.name / model)
    flags = [f"--raw={tmp_path / 'no_raw'}", f"--preprocessed={tmp_path / 'no_pre'}", f"--results={results}"]
    command = ["predict", "-i", str(pipeline.dataset / "imagesTs"), "-d", "999", "-f", "0", "--disable-tta", *flags]
    assert main([*command, "-o", str(tmp_path / "out")]) == 0
    for case in CASES:
        written = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(written),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(_cli_output(pipeline, case)))))
    shutil.copytree(results / pipeline.name / model, results / pipeline.name / "2d__unet")
    assert main([*command, "-o", str(tmp_path / "again")]) == 2
    assert f"2 trained model(s) fit (2d__unet, {model}): give -c and -a" in capsys.readouterr().err


def test_bad_inputs_say_what_is_wrong(segmenter, tmp_path):
    with pytest.raises(UsageError, match="needs its spacing"):
        segmenter.predict(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(UsageError, match="channel"):
        segmenter.predict(np.zeros((2, 4, 5, 6), np.float32), spacing=(1, 1, 1))
    with pytest.raises(UsageError, match="cannot segment a dict"):
        segmenter.predict({})
    with pytest.raises(autoseg.errors.ImageReadError, match="does not exist"):
        segmenter.predict(tmp_path / "nothing.nii.gz")
    with pytest.raises(UsageError, match="neither a model package"):
        autoseg.Segmenter.load(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        autoseg.Segmenter.load(tmp_path / "model.zip")
    (tmp_path / "cut.zip").write_bytes(b"PK\x03\x04 a download cut short")
    with pytest.raises(autoseg.errors.PackageError, match="not a model package zip"):
        autoseg.Segmenter.load(tmp_path / "cut.zip")
    for spacing in ((float("nan"), 1, 1), (0, 1, 1)):  # NaN passed a min() <= 0 test
        with pytest.raises(UsageError, match="spacing must be positive and finite"):
            segmenter.predict(np.ones((4, 5, 6), np.float32), spacing=spacing)
    with pytest.raises(UsageError, match="orthonormal"):
        segmenter.predict(np.ones((4, 5, 6), np.float32), spacing=(1, 1, 1), direction=np.ones((3, 3)))
    with pytest.raises(UsageError, match="a 2D image .* cannot be predicted by the 3D configuration"):
        segmenter.predict(np.ones((40, 30), np.float32), spacing=(1, 1))


def test_bad_load_arguments_say_what_is_wrong(model_package):
    # "onnx" for "onnxruntime" ran torch without a word; folds=[] meant every fold of a package.
    with pytest.raises(UsageError, match="engine must be 'torch' or 'onnxruntime', got 'onnx'"):
        autoseg.Segmenter.load(model_package, engine="onnx")
    with pytest.raises(UsageError, match="folds is empty"):
        autoseg.Segmenter.load(model_package, folds=[])


def test_a_direction_given_as_a_matrix_is_taken(segmenter):
    image = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    as_matrix = segmenter.predict(image, spacing=(3.0, 1.0, 1.0), direction=np.eye(3))
    as_numbers = segmenter.predict(image, spacing=(3.0, 1.0, 1.0), direction=np.eye(3).ravel().tolist())
    assert np.array_equal(as_matrix, as_numbers)


def test_the_readme_example_runs(pipeline, model_package, tmp_path, monkeypatch, request):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copy(model_package, "hippocampus.zip")
    shutil.copy(pipeline.dataset / "imagesTs" / f"{CASES[0]}_0000.nii.gz", "scan.nii.gz")
    namespace: dict = {}
    # The example sets torch's threads (threads=2) for the whole process: put them back for the tests after it,
    # whose references were predicted at the session's count (channels-last sums depend on it: README).
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README's example
    # The example predicts with mirroring (the default); the CLI on the same file must agree.
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy("scan.nii.gz", inputs / "scan_0000.nii.gz")
    assert main(["predict", "-m", "hippocampus.zip", "-i", str(inputs), "-o", str(tmp_path / "out")]) == 0
    written = sitk.ReadImage(str(tmp_path / "out" / "scan.nii.gz"))
    mask = sitk.ReadImage("scan_mask.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(written))
    assert mask.GetOrigin() == written.GetOrigin() and mask.GetDirection() == written.GetDirection()
    assert namespace["probs"].shape == (3, *sitk.GetArrayFromImage(written).shape)
