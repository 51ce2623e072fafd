"""Bad input for the commands that come after the dataset check: train, predict, evaluate (and report).

(``check`` and ``plan-and-preprocess`` meet the raw-dataset corpus in ``test_check.py``.)
Every fault is built here in a temporary folder and fed to every command that reads that
kind of file; each must exit 2 with one stderr line naming the file and the problem, no
traceback, and no new output file. The model and data they start from come from one
pipeline run with spaces and non-ASCII characters in every path.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg.cli import main
from autoseg.networks.registry import build_network
from autoseg.planning.plans import load_plans, save_plans
from tests.conftest import TRAIN_TINY as TRAIN
from tests.conftest import Pipeline, edit_json
from tests.faults import (FILE_FAULTS, INTENSITY_FAULTS, LABEL_FAULTS, assert_complete, assert_refused,
                          disk_full_after, files_under, needs_permissions, permissions_enforced, run_cli)

torch.set_num_threads(1)  # two threads on a busy 2-core machine spin-wait each other into a crawl


def test_every_command_works_with_spaces_and_non_ascii_in_every_path(pipeline):
    assert pipeline.codes == {"check": 0, "plan-and-preprocess": 0, "train": 0, "predict": 0, "evaluate": 0}
    assert sorted(p.name for p in pipeline.predictions.iterdir()) == ["synth_006.nii.gz", "synth_007.nii.gz"]
    assert len(json.loads((pipeline.evaluation / "summary.json").read_text())["per_case"]) == 2
    assert (pipeline.fold / "checkpoint_final.pt").is_file() and (pipeline.fold / "validation" / "summary.json").is_file()


# ---- predict ---------------------------------------------------------------------------------------------------

def _predict(p: Pipeline, inputs: Path, output: Path, results: Path | None = None, *extra) -> list[str]:
    return ["predict", "-i", inputs, "-o", output, "-d", "999", "-c", "3d_fullres", "-f", "0", "--disable-tta",
            f"--raw={p.raw}", f"--preprocessed={p.pre}", f"--results={results or p.res}", *extra]


def _test_images(p: Pipeline, folder: Path) -> Path:
    shutil.copytree(p.dataset / "imagesTs", folder)
    return folder


@pytest.mark.parametrize("fault", sorted({**FILE_FAULTS, **INTENSITY_FAULTS}))
def test_predict_names_a_bad_image_skips_it_and_writes_the_rest(pipeline, tmp_path, capsys, fault):
    damage, problem = {**FILE_FAULTS, **INTENSITY_FAULTS}[fault]
    inputs = _test_images(pipeline, tmp_path / "in")
    damage(inputs / "synth_006_0000.nii.gz")
    with needs_permissions(fault):
        outcome = run_cli(_predict(pipeline, inputs, tmp_path / "out"), capsys)
    assert_refused(outcome, "synth_006_0000.nii.gz", problem)
    assert sorted(files_under(tmp_path / "out")) == [str(tmp_path / "out" / "synth_007.nii.gz")]


def _shifted(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    image.SetOrigin([o + 25.0 for o in image.GetOrigin()])
    sitk.WriteImage(image, str(path))


def test_predict_refuses_a_missing_misnumbered_or_misplaced_channel(pipeline, tmp_path, capsys):
    """A two-channel model; each broken case is named and skipped, the complete one is written."""
    fold = tmp_path / "res" / pipeline.name / "3d_fullres__unet" / "fold_0"
    fold.mkdir(parents=True)
    plans = load_plans(pipeline.fold / "plans.json")
    plans.channel_names, plans.normalization = ["T1", "T2"], plans.normalization * 2
    save_plans(plans, fold / "plans.json")
    network = build_network(plans.architecture("3d_fullres"), 2, plans.num_segmentation_heads, 3)
    torch.save({"model": network.state_dict()}, fold / "checkpoint_final.pt")
    source = pipeline.dataset / "imagesTs" / "synth_006_0000.nii.gz"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("good_0000", "good_0001", "onlyone_0000", "gap_0000", "gap_0002", "shifted_0000", "shifted_0001"):
        shutil.copy(source, inputs / f"{name}.nii.gz")
    _shifted(inputs / "shifted_0001.nii.gz")
    outcome = run_cli(_predict(pipeline, inputs, tmp_path / "out", tmp_path / "res"), capsys)
    assert_refused(outcome, "onlyone_0000.nii.gz", "has 1 channel(s), the model expects 2")
    assert_refused(outcome, "gap_0000.nii.gz", "channel files [0, 2], expected 0..1")
    assert_refused(outcome, "shifted_0001.nii.gz", "origin")
    assert sorted(Path(f).name for f in files_under(tmp_path / "out")) == ["good.nii.gz"]


# ---- the trained model: plans.json and checkpoints, read by train and predict ----------------------------------

def _edit_architecture(**changes):
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        data["configurations"]["3d_fullres"]["architectures"]["unet"].update(changes)
        path.write_text(json.dumps(data))
    return damage


def _without(key):
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        del data[key]
        path.write_text(json.dumps(data))
    return damage


# name -> (damage(plans.json), problem). The class paths name a module that would leave a mark if imported.
PLANS_FAULTS = {
    "invalid JSON": (lambda p: p.write_text('{"schema_version": 1,'), "invalid JSON"),
    "missing key": (_without("configurations"), "missing field 'configurations'"),
    "wrong type": (_edit_architecture(batch_size="two"), "expected an integer, got 'two'"),
    "a class path to import": (_edit_architecture(network_class_name="marker_module.Net"),
                               "unknown field(s) ['network_class_name']"),
    "an architecture named by its class path": (_edit_architecture(name="marker_module.Net"),
                                                "unknown architecture 'marker_module.Net'"),
    "impossible patch": (_edit_architecture(patch_size=[8, 30, 32]), "must be divisible"),
    "no read permission": (lambda p: p.chmod(0), "permission denied"),
}


@pytest.fixture
def marker_module(tmp_path, monkeypatch) -> Path:
    """An importable ``marker_module`` that writes a file when it is imported; returns that file's path."""
    marker = tmp_path / "imported"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "marker_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nNet = None\n")
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    return marker


def _copy_results(p: Pipeline, tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "res"
    shutil.copytree(p.res, results)
    return results, results / p.name / "3d_fullres__unet" / "fold_0"


@pytest.mark.parametrize("command", ["plan-and-preprocess --keep-plans", "train", "predict"])
@pytest.mark.parametrize("fault", sorted(PLANS_FAULTS))
def test_a_bad_plans_file_is_refused_and_nothing_is_imported(pipeline, tmp_path, capsys, marker_module, command,
                                                            fault):
    damage, problem = PLANS_FAULTS[fault]
    results, fold = _copy_results(pipeline, tmp_path)
    pre = tmp_path / "pre"
    shutil.copytree(pipeline.pre, pre)
    flags = [f"--raw={pipeline.raw}", f"--preprocessed={pre}", f"--results={results}"]
    if command == "predict":  # the plans.json saved beside the model
        plans_file, argv = fold / "plans.json", _predict(pipeline, _test_images(pipeline, tmp_path / "in"),
                                                         tmp_path / "out", results)
    else:  # the preprocessed dataset's plans.json
        plans_file = pre / pipeline.name / "plans.json"
        argv = [*TRAIN, *flags] if command == "train" else [
            "plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1", "--keep-plans", *flags]
    damage(plans_file)
    before = files_under(results, pre, tmp_path / "out")
    with needs_permissions(fault):
        outcome = run_cli(argv, capsys)
    assert_refused(outcome, plans_file, problem)
    assert files_under(results, pre, tmp_path / "out") == before
    assert not marker_module.exists() and "marker_module" not in sys.modules


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: what a pickle may do when ``weights_only`` is off."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


CHECKPOINT_FAULTS = {
    "pickled object that runs code": (lambda p, marker: torch.save({"model": _RunsCode(marker)}, p),
                                      "not a valid autoseg checkpoint"),
    "truncated": (lambda p, marker: _truncated(p), "not a valid autoseg checkpoint"),
    "a bare tensor": (lambda p, marker: torch.save(torch.zeros(3), p), "does not hold"),
    "no read permission": (lambda p, marker: p.chmod(0), "permission denied"),
}


@pytest.mark.parametrize("command", ["train --continue", "predict"])
@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_a_bad_checkpoint_is_refused_and_nothing_in_it_runs(pipeline, tmp_path, capsys, command, fault):
    damage, problem = CHECKPOINT_FAULTS[fault]
    results, fold = _copy_results(pipeline, tmp_path)
    marker = tmp_path / "code ran"
    if command == "predict":
        checkpoint, argv = fold / "checkpoint_final.pt", _predict(pipeline, _test_images(pipeline, tmp_path / "in"),
                                                                  tmp_path / "out", results)
    else:
        checkpoint, argv = fold / "checkpoint_latest.pt", [*TRAIN, "--continue", *pipeline.flags[:2],
                                                           f"--results={results}"]
    damage(checkpoint, marker)
    before = files_under(results, tmp_path / "out")
    with needs_permissions(fault):
        outcome = run_cli(argv, capsys)
    assert_refused(outcome, checkpoint, problem)
    assert files_under(results, tmp_path / "out") == before and not marker.exists()


# ---- train: splits and preprocessed cases ----------------------------------------------------------------------

def _case_file(suffix: str):
    return lambda pre: next(pre.glob("3d_fullres_*")) / f"synth_000{suffix}"


def _damage(where, how):
    def damage(pre: Path) -> Path:
        path = where(pre)
        how(path)
        return path
    return damage


# name -> (damage(preprocessed dataset folder) -> the file it broke, problem)
TRAINING_DATA_FAULTS = {
    "splits.json: invalid JSON": (_damage(lambda pre: pre / "splits.json", lambda p: p.write_text("[{")), "invalid JSON"),
    "splits.json: wrong structure": (_damage(lambda pre: pre / "splits.json", lambda p: p.write_text('{"0": []}')),
                                     "must be a non-empty list"),
    "splits.json: unknown case": (_damage(lambda pre: pre / "splits.json", lambda p: p.write_text(
        '[{"train": ["synth_000", "ghost"], "val": ["synth_001"]}]')), "not preprocessed: ['ghost']"),
    "image array truncated": (_damage(_case_file(".npy"), _truncated), "cannot be read"),
    "image array without read permission": (_damage(_case_file(".npy"), lambda p: p.chmod(0)), "permission denied"),
    "segmentation missing": (_damage(_case_file("_seg.npy"), Path.unlink), "segmentation is missing"),
    "segmentation of another shape": (_damage(_case_file("_seg.npy"), lambda p: np.save(p, np.zeros((3, 4, 5),
                                                                                                    np.int16))),
                                      "differs from the"),
    "case properties invalid": (_damage(_case_file(".json"), lambda p: p.write_text("{")), "invalid JSON"),
}


@pytest.mark.parametrize("fault", sorted(TRAINING_DATA_FAULTS))
def test_train_names_a_bad_split_or_preprocessed_case_before_training(pipeline, tmp_path, capsys, fault):
    damage, problem = TRAINING_DATA_FAULTS[fault]
    pre = tmp_path / "pre"
    shutil.copytree(pipeline.pre, pre)
    broken = damage(pre / pipeline.name)
    with needs_permissions(fault):
        outcome = run_cli([*TRAIN, f"--raw={pipeline.raw}", f"--preprocessed={pre}", f"--results={tmp_path / 'res'}"],
                          capsys)
    assert_refused(outcome, broken, problem)
    assert files_under(tmp_path / "res") == {}


def test_a_case_that_breaks_while_workers_load_it_is_one_line_not_a_worker_traceback(pipeline, tmp_path):
    from autoseg.errors import DatasetError
    from autoseg.training.data import PatchSampler, batch_iterator

    folder = tmp_path / "cases"
    shutil.copytree(next((pipeline.pre / pipeline.name).glob("3d_fullres_*")), folder)
    sampler = PatchSampler(folder, ["synth_000"], [8, 32, 32], 2, augment=False)
    _truncated(folder / "synth_000.npy")  # after the start-up check: as if the disk failed mid-run
    batches = batch_iterator(sampler, num_workers=1, seed=0)
    with pytest.raises(DatasetError) as error:
        next(batches)
    message = str(error.value)
    assert "synth_000.npy: preprocessed case cannot be read" in message
    assert "\n" not in message and "Traceback" not in message
    batches.close()


# ---- evaluate --------------------------------------------------------------------------------------------------

EVALUATE_FAULTS = {**FILE_FAULTS, **LABEL_FAULTS, **{k: INTENSITY_FAULTS[k] for k in ("NaN intensities",
                                                                                     "Inf intensities")}}


def _evaluate(p: Pipeline, references: Path, predictions: Path, output: Path, *extra) -> list:
    return ["evaluate", references, predictions, "-np", "1", "-o", output, *(extra or ["-d", "999"]), *p.flags]


def _folders(p: Pipeline, tmp_path: Path) -> tuple[Path, Path]:
    references, predictions = tmp_path / "references", tmp_path / "predictions"
    shutil.copytree(p.dataset / "labelsTs", references)
    shutil.copytree(p.predictions, predictions)
    return references, predictions


@pytest.mark.parametrize("command", ["evaluate", "report"])
@pytest.mark.parametrize("side", ["references", "predictions"])
@pytest.mark.parametrize("fault", sorted(EVALUATE_FAULTS))
def test_evaluate_names_a_bad_label_map_and_writes_nothing(pipeline, tmp_path, capsys, command, side, fault):
    damage, problem = EVALUATE_FAULTS[fault]
    folders = dict(zip(("references", "predictions"), _folders(pipeline, tmp_path)))
    damage(folders[side] / "synth_006.nii.gz")
    argv = _evaluate(pipeline, folders["references"], folders["predictions"], tmp_path / "out")
    with needs_permissions(fault):
        outcome = run_cli([command, *argv[1:]], capsys)
    if (command, side, fault) == ("report", "predictions", "directory named like an image"):
        problem = "no prediction for 1 reference(s)"  # report lists files only: a directory is no prediction
    assert_refused(outcome, folders[side] / "synth_006.nii.gz", problem)
    assert files_under(tmp_path / "out") == {}


@pytest.mark.parametrize("option, value", [("--class-tolerance", "organ_a=abc"), ("--class-tolerance", "organ_a=-2"),
                                           ("--class-tolerance", "nosuch=1"), ("--class-tolerance", "background=2"),
                                           ("--tolerance", "-1")])
def test_evaluate_refuses_a_tolerance_that_is_no_positive_number(pipeline, tmp_path, capsys, option, value):
    references, predictions = _folders(pipeline, tmp_path)
    outcome = run_cli(_evaluate(pipeline, references, predictions, tmp_path / "out", "-d", "999", option, value), capsys)
    assert_refused(outcome, value if option == "--class-tolerance" else "--tolerance -1", "positive number")
    if value == "background=2":
        assert "NAME one of ['organ_a', 'organ_b']" in outcome.err  # no surface to score for background
    assert files_under(tmp_path / "out") == {}


def _set_geometry(**geometry):
    def damage(path: Path) -> None:
        image = sitk.ReadImage(str(path))
        for key, value in geometry.items():
            getattr(image, f"Set{key}")(value)
        sitk.WriteImage(image, str(path))
    return damage


def _cut_slice(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:, :, :-1], str(path))


def _dataset_json(change):
    def damage(references: Path, predictions: Path) -> tuple[str, ...]:
        path = references.parent / "description" / "dataset.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ_a": 1,
                                    "organ_b": 2}, "file_ending": ".nii.gz"}))
        change(path)
        return ("--dataset-json", str(path))
    return damage


def _on_prediction(damage):
    def apply(references: Path, predictions: Path) -> tuple[str, ...]:
        damage(predictions / "synth_006.nii.gz")
        return ()
    return apply


# name -> (damage(references, predictions) -> extra arguments, file named, problem)
PAIRING_FAULTS = {
    "shape mismatch": (_on_prediction(_cut_slice), "synth_006.nii.gz", "shape"),
    "spacing mismatch": (_on_prediction(_set_geometry(Spacing=(1.0, 1.0, 2.0))), "synth_006.nii.gz", "spacing"),
    "origin mismatch": (_on_prediction(_set_geometry(Origin=(500.0, 0.0, 0.0))), "synth_006.nii.gz", "origin"),
    "direction mismatch": (_on_prediction(_set_geometry(Direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))), "synth_006.nii.gz",
                           "direction"),
    "reference without prediction": (_on_prediction(Path.unlink), "predictions", "no prediction for 1 reference(s)"),
    "prediction without reference": (
        lambda r, p: (shutil.copy(p / "synth_006.nii.gz", p / "extra.nii.gz"), ())[1], "predictions",
        "for 1 prediction(s): extra.nii.gz"),
    "dataset.json: invalid JSON": (_dataset_json(lambda p: p.write_text("{")), "dataset.json", "invalid JSON"),
    "dataset.json: missing key": (_dataset_json(lambda p: p.write_text('{"labels": {"background": 0}}')),
                                  "dataset.json", "missing key 'channel_names'"),
    "dataset.json: wrong type": (_dataset_json(lambda p: edit_json(p, labels={"background": 0, "a": "1"})),
                                 "dataset.json", "must be an integer"),
    "dataset.json: no background": (_dataset_json(lambda p: edit_json(p, labels={"organ_a": 1})), "dataset.json",
                                    "must contain \"background\": 0"),
    "dataset.json: file_ending that matches nothing": (_dataset_json(lambda p: edit_json(p, file_ending=".nrrd")),
                                                       "references", "no reference files ending in .nrrd"),
}


@pytest.mark.parametrize("fault", sorted(PAIRING_FAULTS))
def test_evaluate_refuses_unpaired_or_misaligned_files_and_a_bad_dataset_json(pipeline, tmp_path, capsys, fault):
    damage, file, problem = PAIRING_FAULTS[fault]
    references, predictions = _folders(pipeline, tmp_path)
    extra = damage(references, predictions)
    outcome = run_cli(_evaluate(pipeline, references, predictions, tmp_path / "out", *extra), capsys)
    assert_refused(outcome, file, problem)
    assert files_under(tmp_path / "out") == {}


# ---- the environment: unwritable output, a full disk, output into the input ------------------------------------

def _command(command: str, p: Pipeline, tmp_path: Path, output: Path) -> list:
    """``command`` on the pipeline's data, writing its output under ``output``."""
    if command == "plan-and-preprocess":
        return ["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-a", "unet", "-np", "1", f"--raw={p.raw}",
                f"--preprocessed={output}", f"--results={tmp_path / 'res'}"]
    if command == "train":
        return [*TRAIN, "--no-validation", *p.flags[:2], f"--results={output}"]
    if command == "predict":
        return _predict(p, p.dataset / "imagesTs", output)
    return _evaluate(p, p.dataset / "labelsTs", p.predictions, output)


WRITING_COMMANDS = ["plan-and-preprocess", "train", "predict", "evaluate"]


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_an_unwritable_output_folder_is_named_before_any_work(pipeline, tmp_path, capsys, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    with permissions_enforced():
        outcome = run_cli(_command(command, pipeline, tmp_path, locked), capsys)
    assert_refused(outcome, "locked", "not writable (Permission denied)")
    assert files_under(locked) == {}


# The first file each command writes that is larger than the limit, so the disk "fills" mid-run.
DISK_LIMITS = {"plan-and-preprocess": (64_000, ".npy"), "train": (48_000, "checkpoint_latest.pt"),
               "predict": (100, "synth_006.nii.gz"), "evaluate": (100, "summary.json")}


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_a_full_disk_is_reported_and_leaves_no_partial_file(pipeline, tmp_path, capsys, command):
    limit, failing_file = DISK_LIMITS[command]
    output = tmp_path / "out"
    with disk_full_after(limit):
        outcome = run_cli(_command(command, pipeline, tmp_path, output), capsys)
    assert_refused(outcome, failing_file, "File too large")
    written = [Path(f) for f in files_under(output)]
    assert not [f for f in written if f.name.startswith(".")], "temporary files are removed"
    for file in written:
        assert_complete(file)


def test_output_into_the_input_is_refused(pipeline, tmp_path, capsys):
    before = files_under(pipeline.raw)
    outcome = run_cli(["plan-and-preprocess", "-d", "999", "-np", "1", f"--raw={pipeline.raw}",
                       f"--preprocessed={pipeline.raw}"], capsys)
    assert_refused(outcome, pipeline.name, "would be written into the raw dataset")
    references, predictions = _folders(pipeline, tmp_path)
    outcome = run_cli(_evaluate(pipeline, references, predictions, references), capsys)
    assert_refused(outcome, "references", "must differ from the references folder")
    assert files_under(pipeline.raw) == before and sorted(p.name for p in references.iterdir()) == [
        "synth_006.nii.gz", "synth_007.nii.gz"]
    # predict -o equal to -i: tests/test_predict.py


# ---- what the user sees ----------------------------------------------------------------------------------------

def test_traceback_only_with_verbose_and_internal_errors_exit_1(pipeline, tmp_path, capsys, monkeypatch):
    results, fold = _copy_results(pipeline, tmp_path)
    (fold / "plans.json").write_text("{")
    argv = _predict(pipeline, pipeline.dataset / "imagesTs", tmp_path / "out", results)
    quiet, verbose = run_cli(argv, capsys), run_cli([*argv, "--verbose"], capsys)
    assert quiet.code == verbose.code == 2
    assert "Traceback" not in quiet.err and "Traceback" in verbose.err
    assert quiet.err.splitlines()[-1] == verbose.err.splitlines()[-1]
    import autoseg.inference.folder

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in autoseg")

    monkeypatch.setattr(autoseg.inference.folder, "predict_folder", bug)
    outcome = run_cli(_predict(pipeline, pipeline.dataset / "imagesTs", tmp_path / "out"), capsys)
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert outcome.err.strip() == ("autoseg: internal error: ZeroDivisionError: a bug in autoseg (run with --verbose "
                                   "for details and report it)")


def test_predict_refuses_contradictory_options_before_writing_anything(pipeline, tmp_path, capsys):
    base = ["predict", "-i", str(pipeline.dataset / "imagesTs"), "-o", str(tmp_path / "out"), *pipeline.flags]
    for extra, message in [(["-d", "999", "--step", "0"], "--step must be in (0, 1]"),
                           (["-d", "999", "--step", "1.5"], "--step must be in (0, 1]"),
                           (["-d", "999", "--windows-per-batch", "0"], "--windows-per-batch must be at least 1"),
                           ([], "give the model: -m PACKAGE, or -d DATASET"),
                           (["-m", str(tmp_path / "model.zip"), "-d", "999"], "-m names the model: leave out -d"),
                           (["-d", "999", "--engine", "onnxruntime"], "--engine onnxruntime runs a package's ONNX")]:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()


def test_predict_keeps_existing_outputs_unless_told_to_overwrite(pipeline, tmp_path, capsys):
    # An output from elsewhere (all background) stands where this model's prediction would go.
    predicted = sorted(pipeline.predictions.glob("*.nii.gz"))[0]
    stale = tmp_path / "out" / predicted.name
    stale.parent.mkdir()
    image = sitk.ReadImage(str(predicted))
    sitk.WriteImage(image * 0, str(stale))
    command = ["predict", "-i", str(pipeline.dataset / "imagesTs"), "-o", str(stale.parent), "-d", "999",
               "-c", "3d_fullres", "-f", "0", "--disable-tta", *pipeline.flags]
    assert main(command) == 0
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(stale))).any(), "an existing output was replaced"
    assert main([*command, "--overwrite"]) == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted)))
    assert expected.any() and np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(stale))), expected)


def test_asking_for_probabilities_predicts_again_the_cases_that_have_none(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pipeline.predictions, out)  # label maps from a run without --save-probabilities
    labels = sorted(p.name for p in out.glob("*.nii.gz"))
    command = ["predict", "-i", str(pipeline.dataset / "imagesTs"), "-o", str(out), "-d", "999", "-c", "3d_fullres",
               "-f", "0", "--disable-tta", *pipeline.flags]
    capsys.readouterr()
    assert main([*command, "--save-probabilities"]) == 0
    assert f"{len(labels)} written, 0 already there" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.npz")) == [name.replace(".nii.gz", ".npz") for name in labels]
