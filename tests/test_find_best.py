import dataclasses
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from autoseg.cli import main
from autoseg.evaluation.find_best import find_best, load_find_best
from autoseg.inference.ensemble import ensemble_folder, save_probability_file
from autoseg.inference.postprocessing import apply_postprocessing, load_postprocessing, save_postprocessing
from autoseg.io.images import read_label, write_label
from autoseg.planning.plans import load_plans
from autoseg.preprocessing.store import list_finished_cases, load_properties
from autoseg.records import save_json
from autoseg.training.splits import load_or_create_splits
from tests.test_training import tiny  # noqa: F401 - the synthetic set preprocessed, with a network that trains in seconds

LABELS = {"background": 0, "organ_a": 1, "organ_b": 2}


def _fake_validation(roots, name, model, folds, case_probabilities):
    """fold_N/validation/ as training leaves it: label maps, CASE.npz and summary.json."""
    plans = load_plans(roots.plans_file(name))
    data = roots.preprocessed_dataset(name) / plans.configurations["3d_fullres"].data_identifier
    splits = load_or_create_splits(roots.preprocessed_dataset(name) / "splits.json", list_finished_cases(data))
    for fold in folds:
        out = roots.results / name / model / f"fold_{fold}" / "validation"
        rows = []
        for case in splits[fold]["val"]:
            reference, geometry = read_label(load_properties(data, case).source_label)
            probabilities = case_probabilities(case, reference)
            write_label(np.array([0, 1, 2])[probabilities.argmax(0)], out / f"{case}.nii.gz", geometry)
            save_probability_file(out / f"{case}.npz", probabilities, [0, 1, 2])
            rows.append({"case": f"{case}.nii.gz"})
        save_json({"per_case": rows}, out / "summary.json")


def _one_hot(reference):
    return np.stack([reference == v for v in (0, 1, 2)]).astype(np.float32)


def _unsure_half(probabilities, reference, value, lower=True):
    """On the half of class ``value`` with the lower (or upper) x, background 0.6 and the class 0.4."""
    where = reference == value
    below = np.arange(reference.shape[2]) < np.median(np.nonzero(where)[2])
    half = where & (below if lower else ~below)[None, None, :]
    probabilities[:, half] = 0.0
    probabilities[0, half], probabilities[value, half] = 0.6, 0.4
    return half


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_find_best_ranks_models_and_ensembles_and_keeps_their_postprocessing(tiny):  # noqa: F811
    roots, name = tiny
    expected_b_dice = {}

    def model_a(case, reference):  # misses half of organ_b, and has a stray organ_b blob in a corner
        assert np.all(reference[:2, :2, :2] == 0)
        p = _one_hot(reference)
        half = _unsure_half(p, reference, 2)
        p[:, :2, :2, :2] = [[[[0.1]]], [[[0.0]]], [[[0.9]]]]
        expected_b_dice[case] = _dice(reference == 2, (reference == 2) & ~half)
        return p

    def model_b(case, reference):  # misses half of organ_a and the other half of organ_b
        p = _one_hot(reference)
        _unsure_half(p, reference, 1)
        _unsure_half(p, reference, 2, lower=False)
        return p

    _fake_validation(roots, name, "3d_fullres__unet", range(5), model_a)
    _fake_validation(roots, name, "3d_fullres__resenc_unet", range(5), model_b)
    _fake_validation(roots, name, "3d_fullres__swin_unetr", range(4), model_b)  # fold 4 not validated
    result = find_best(roots, name, LABELS, num_processes=1, progress=False)

    ensemble = "3d_fullres__resenc_unet+3d_fullres__unet"
    assert [c.name for c in result.ranking] == [ensemble, "3d_fullres__unet", "3d_fullres__resenc_unet"]
    # Where one member is unsure (0.6 / 0.4) the other is sure: the average is right everywhere.
    assert result.ranking[0].mean_dice == pytest.approx(1.0)
    assert result.predict_command.endswith(f"-d {name} -c 3d_fullres -a resenc_unet unet -f 0 1 2 3 4")
    assert any("swin_unetr" in line and "fold(s) 4" in line for line in result.not_compared)
    # Model a: the stray blob goes, the missed half stays.
    a = next(c for c in result.ranking if c.name == "3d_fullres__unet")
    assert a.mean_dice < a.mean_dice_postprocessed
    assert a.per_class_dice_postprocessed["organ_b"] == pytest.approx(np.mean(list(expected_b_dice.values())))
    assert load_postprocessing(roots.results / name / "3d_fullres__unet").changes_anything
    assert not load_postprocessing(roots.results / name / "3d_fullres__resenc_unet").changes_anything
    assert load_postprocessing(ensemble_folder(roots, name, ["3d_fullres__unet", "3d_fullres__resenc_unet"]))
    assert load_find_best(roots.results / name / "find_best.json").best == ensemble
    assert result.predict_command in (roots.results / name / "find_best.txt").read_text()

    # Without probabilities for every case there is no ensemble, and the reason is given.
    next((roots.results / name / "3d_fullres__resenc_unet" / "fold_2" / "validation").glob("*.npz")).unlink()
    result = find_best(roots, name, LABELS, num_processes=1, progress=False)
    assert [c.name for c in result.ranking] == ["3d_fullres__unet", "3d_fullres__resenc_unet"]
    assert any("ensembles with 3d_fullres__resenc_unet" in line and "--save-probabilities" in line
               for line in result.not_compared)
    on_four_folds = find_best(roots, name, LABELS, folds=["0", "1", "2", "3"], num_processes=1, progress=False)
    assert "3d_fullres__swin_unetr" in [c.name for c in on_four_folds.ranking]
    assert on_four_folds.predict_command.endswith("-f 0 1 2 3")


def test_five_tiny_folds_then_find_best_then_predict_with_the_postprocessing(tiny, tmp_path, capsys):  # noqa: F811
    roots, name = tiny
    flags = [f"--raw={roots.raw}", f"--preprocessed={roots.preprocessed}", f"--results={tmp_path / 'res'}"]
    for fold in range(5):
        assert main(["train", "999", "3d_fullres", str(fold), "--epochs", "1", "--iters-per-epoch", "2",
                     "--val-iters", "1", "--num-workers", "0", "--seed", "0"] + flags) == 0
        assert (fold == 4) == (tmp_path / "res" / name / "3d_fullres__unet" / "postprocessing.json").exists()
    model_dir = tmp_path / "res" / name / "3d_fullres__unet"
    assert "postprocessing (cross-validation of 5 folds, 6 cases)" in capsys.readouterr().out
    # The postprocessing's Dice before any step is the evaluation's Dice of the same predictions.
    rows = [row for f in range(5) for row in
            json.loads((model_dir / f"fold_{f}" / "validation" / "summary.json").read_text())["per_case"]]
    decision = load_postprocessing(model_dir)
    assert decision.num_cases == len(rows) == 6
    for organ in ("organ_a", "organ_b"):
        assert decision.dice_before[organ] == pytest.approx(np.mean([r[f"{organ}/dice"] for r in rows]), abs=1e-9)

    # Validation alone, again: the record is rewritten from the new predictions. A prediction of a case the
    # fold no longer validates (its split changed since) is not evaluated with them: that ended in an error.
    (model_dir / "fold_0" / "validation" / "summary.json").unlink()
    shutil.copy(next((model_dir / "fold_0" / "validation").glob("*.nii.gz")),
                model_dir / "fold_0" / "validation" / "synth_099.nii.gz")
    assert main(["train", "999", "3d_fullres", "0", "--validation-only", "--save-probabilities"] + flags) == 0
    assert list((model_dir / "fold_0" / "validation").glob("*.npz"))
    assert not (model_dir / "fold_0" / "validation" / "synth_099.nii.gz").exists()

    assert main(["find-best", "-d", "999", "-np", "1"] + flags) == 0
    out = capsys.readouterr().out
    assert "best: 3d_fullres__unet" in out and "-c 3d_fullres -a unet -f 0 1 2 3 4" in out
    assert "ensembles with 3d_fullres__unet: its validation kept no probabilities" in out  # folds 1-4 kept none

    images = roots.raw / name / "imagesTs"
    predict = ["predict", "-i", str(images), "-d", "999", "-c", "3d_fullres", "-f", "0", "1", "--disable-tta"] + flags
    assert main(predict + ["-o", str(tmp_path / "plain"), "--no-postprocessing"]) == 0
    assert main(predict + ["-o", str(tmp_path / "post")]) == 0
    decision = load_postprocessing(model_dir)
    assert f"postprocessing: {decision.describe()}" in capsys.readouterr().out
    for case in ("synth_006", "synth_007"):
        plain, _ = read_label(tmp_path / "plain" / f"{case}.nii.gz")
        post, _ = read_label(tmp_path / "post" / f"{case}.nii.gz")
        assert np.array_equal(post, apply_postprocessing(plain, decision))
    # Whether the cross-validation keeps a step depends on the untrained network's speckle; a
    # decision that keeps every step (as a model folder may hold) must change what is written.
    keep_all = dataclasses.replace(decision, largest_foreground_component=True,
                                   largest_component_classes={"organ_a": [1], "organ_b": [2]})
    save_postprocessing(keep_all, model_dir)
    assert main(predict + ["-o", str(tmp_path / "kept")]) == 0
    assert f"postprocessing: {keep_all.describe()}" in capsys.readouterr().out
    changed = 0
    for case in ("synth_006", "synth_007"):
        plain, _ = read_label(tmp_path / "plain" / f"{case}.nii.gz")
        kept, _ = read_label(tmp_path / "kept" / f"{case}.nii.gz")
        assert np.array_equal(kept, apply_postprocessing(plain, keep_all))
        assert ndimage.label(kept > 0)[1] < ndimage.label(plain > 0)[1]
        changed += int(not np.array_equal(kept, plain))
    assert changed == 2  # an all but untrained network's masks are speckled: hundreds of components
