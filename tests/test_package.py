"""autoseg export and predict -m: the round trip, and packages that must be refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg.cli import main


@pytest.fixture(scope="module")
def package(pipeline, tmp_path_factory) -> Path:
    assert pipeline.codes["train"] == 0
    target = tmp_path_factory.mktemp("package") / "synthetic model.zip"
    assert main(["export", "-d", "999", "-c", "3d_fullres", "-f", "0", "-o", str(target), *pipeline.flags]) == 0
    return target


def _members(package: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(package) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write(path: Path, members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = ((0o120777 if name in symlinks else 0o100644) << 16)
            archive.writestr(info, data)
    return path


def _relist(members: dict[str, bytes], name: str) -> None:
    """Make model.json agree with a changed member (what a careful attacker would do)."""
    manifest = json.loads(members["model.json"])
    manifest["files"][name] = {"size": len(members[name]), "sha256": hashlib.sha256(members[name]).hexdigest()}
    members["model.json"] = json.dumps(manifest).encode()


def _predict(model: Path, pipeline, out: Path, *extra: str) -> int:
    return main(["predict", "-m", str(model), "-i", str(pipeline.dataset / "imagesTs"), "-o", str(out),
                 "--disable-tta", *extra])


def test_package_holds_what_the_manifest_says_and_predicts_like_the_results_folder(pipeline, package, tmp_path):
    members = _members(package)
    manifest = json.loads(members["model.json"])
    checkpoint = "models/3d_fullres__unet/fold_0/checkpoint_final.pt"
    assert set(members) == {"model.json", "dataset.json", "models/3d_fullres__unet/plans.json", checkpoint}
    for name, entry in manifest["files"].items():
        assert entry == {"size": len(members[name]), "sha256": hashlib.sha256(members[name]).hexdigest()}
    assert manifest["dataset"] == pipeline.name and manifest["torch_version"] == torch.__version__
    assert manifest["labels"] == json.loads((pipeline.dataset / "dataset.json").read_text())["labels"]
    # The weights are the trained ones, without the optimiser state.
    original = torch.load(pipeline.fold / "checkpoint_final.pt", weights_only=True)["model"]
    packed = torch.load(io.BytesIO(members[checkpoint]), weights_only=True)
    assert list(packed) == ["model"] and all(torch.equal(packed["model"][k], v) for k, v in original.items())
    # Cross-validation scores: those `evaluate` wrote for the fold's validation.
    summary = json.loads((pipeline.fold / "validation" / "summary.json").read_text())
    for name, scores in summary["per_class"].items():
        assert manifest["models"][0]["cross_validation"][name]["dice"] == pytest.approx(scores["mean"]["dice"])
    assert manifest["models"][0]["checkpoints"] == {"0": "checkpoint_final.pt"}

    # Predicting from the zip and from its unpacked folder writes the files `predict -d` wrote.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(package).extractall(unpacked)
    for source, out in ((package, tmp_path / "from_zip"), (unpacked, tmp_path / "from_folder")):
        assert _predict(source, pipeline, out) == 0
        for expected in sorted(pipeline.predictions.glob("*.nii.gz")):
            written = sitk.ReadImage(str(out / expected.name))
            reference = sitk.ReadImage(str(expected))
            assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(reference))
            assert written.GetOrigin() == reference.GetOrigin() and written.GetSpacing() == reference.GetSpacing()
            assert written.GetDirection() == reference.GetDirection()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("autoseg-package-*/model.json")), "unpacked copy kept"


def _refused(pipeline, model: Path, tmp_path: Path, capsys, *needles: str) -> None:
    out = tmp_path / "out"
    assert _predict(model, pipeline, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model) in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() or not list(out.iterdir()), "nothing is written"


CHECKPOINT = "models/3d_fullres__unet/fold_0/checkpoint_final.pt"


def test_a_tampered_member_is_refused_naming_it(pipeline, package, tmp_path, capsys):
    members = _members(package)
    weights = bytearray(members[CHECKPOINT])
    weights[len(weights) // 2] ^= 0xFF
    members[CHECKPOINT] = bytes(weights)
    _refused(pipeline, _write(tmp_path / "tampered.zip", members), tmp_path, capsys, CHECKPOINT, "sha256")


def test_damaged_compressed_data_is_refused_naming_the_member(pipeline, package, tmp_path, capsys):
    # A download cut or corrupted in transit damages the deflate stream itself (the tampering test above
    # changes bytes before compression): zlib raises its own error, which escaped as "internal error".
    with zipfile.ZipFile(package) as archive:
        info = archive.getinfo(CHECKPOINT)
    raw = bytearray(package.read_bytes())
    name_and_extra = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") + \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    middle = info.header_offset + 30 + name_and_extra + info.compress_size // 2
    raw[middle:middle + 64] = b"\xff" * 64
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(raw))
    _refused(pipeline, damaged, tmp_path, capsys, CHECKPOINT, "cannot be unpacked")


def test_an_unknown_fold_is_named_against_the_package_not_a_member(pipeline, package, tmp_path, capsys):
    assert _predict(package, pipeline, tmp_path / "out", "-f", "7") == 2
    err = capsys.readouterr().err
    assert f"{package}: fold(s) 7 are not in the package (it holds 0)" in err and "member '.'" not in err, err


def test_a_member_escaping_the_folder_is_refused(pipeline, package, tmp_path, capsys):
    members = {**_members(package), "../../escaped.txt": b"x"}
    _refused(pipeline, _write(tmp_path / "escape.zip", members), tmp_path, capsys, "../../escaped.txt", "outside")
    assert not (tmp_path.parent / "escaped.txt").exists()
    members = {**_members(package), "/etc/cron.d/job": b"x"}
    _refused(pipeline, _write(tmp_path / "absolute.zip", members), tmp_path, capsys, "/etc/cron.d/job", "outside")


def test_a_manifest_naming_a_model_folder_outside_the_package_is_refused(pipeline, package, tmp_path, capsys):
    # Its files all verify, but the loader joins configuration/architecture/fold names into paths: "../.."
    # would have it read plans and weights that no sha256 covered.
    members = _members(package)
    manifest = json.loads(members["model.json"])
    manifest["models"][0]["folds"] = ["0/../../../elsewhere"]
    members["model.json"] = json.dumps(manifest).encode()
    _refused(pipeline, _write(tmp_path / "escape.zip", members), tmp_path, capsys, "'0/../../../elsewhere'",
             "not a plain name")


def test_a_symbolic_link_is_refused_in_a_zip_and_in_a_folder(pipeline, package, tmp_path, capsys):
    members = _members(package)
    members["dataset.json"] = b"/etc/passwd"
    _relist(members, "dataset.json")
    _refused(pipeline, _write(tmp_path / "link.zip", members, symlinks=("dataset.json",)), tmp_path, capsys,
             "dataset.json", "symbolic link")
    folder = tmp_path / "folder"
    zipfile.ZipFile(package).extractall(folder)
    plans = folder / "models/3d_fullres__unet/plans.json"
    plans.rename(tmp_path / "elsewhere.json")
    plans.symlink_to(tmp_path / "elsewhere.json")
    _refused(pipeline, folder, tmp_path, capsys, "models/3d_fullres__unet/plans.json", "symbolic link")


def test_a_zip_bomb_is_refused_before_it_is_unpacked(pipeline, package, tmp_path, capsys):
    members = _members(package)
    members["dataset.json"] = members["dataset.json"] + b" " * (64 << 20)  # 64 MB that deflate to ~64 kB
    _relist(members, "dataset.json")
    _refused(pipeline, _write(tmp_path / "bomb.zip", members), tmp_path, capsys, "dataset.json", "zip bomb")


def test_a_missing_or_unlisted_member_is_refused(pipeline, package, tmp_path, capsys):
    members = _members(package)
    del members["models/3d_fullres__unet/plans.json"]
    _refused(pipeline, _write(tmp_path / "missing.zip", members), tmp_path, capsys,
             "models/3d_fullres__unet/plans.json", "missing")
    members = {**_members(package), "extra.py": b"print('hello')"}
    _refused(pipeline, _write(tmp_path / "extra.zip", members), tmp_path, capsys, "extra.py", "not listed")
    folder = tmp_path / "unpacked"  # an unpacked folder too: a fold-level plans.json would win over the listed one
    zipfile.ZipFile(package).extractall(folder)
    (folder / "models/3d_fullres__unet/fold_0/plans.json").write_text("{}")
    _refused(pipeline, folder, tmp_path, capsys, "models/3d_fullres__unet/fold_0/plans.json", "not listed")


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_that_would_run_code_is_refused_even_with_a_matching_manifest(pipeline, package, tmp_path, capsys):
    members = _members(package)
    members[CHECKPOINT] = pickle.dumps({"model": _Code()})
    _relist(members, CHECKPOINT)
    _refused(pipeline, _write(tmp_path / "pickle.zip", members), tmp_path, capsys, "checkpoint_final.pt",
             "not a valid autoseg checkpoint")
    assert "code ran" not in capsys.readouterr().out


def test_a_plan_from_a_newer_autoseg_says_which_version_made_the_package(pipeline, package, tmp_path, capsys):
    # A plan written by a newer autoseg holds a field this one does not know: the error alone ("unknown field")
    # does not tell the user to install the version that made the package.
    members = _members(package)
    plans_member = "models/3d_fullres__unet/plans.json"
    plans = json.loads(members[plans_member])
    plans["future_setting"] = 1
    members[plans_member] = json.dumps(plans).encode()
    _relist(members, plans_member)
    manifest = json.loads(members["model.json"])
    manifest["autoseg_version"] = "9.0.0"
    members["model.json"] = json.dumps(manifest).encode()
    _refused(pipeline, _write(tmp_path / "newer.zip", members), tmp_path, capsys, f"member '{plans_member}'",
             "unknown field(s) ['future_setting']", "the package was made by autoseg 9.0.0 with torch",
             "install the version that made it")


def test_export_refuses_untrained_folds_and_a_name_without_zip(pipeline, tmp_path, capsys):
    assert main(["export", "-d", "999", "-c", "3d_fullres", "-f", "0", "1", "-o", str(tmp_path / "m.zip"),
                 *pipeline.flags]) == 2
    assert "fold_1" in capsys.readouterr().err and not (tmp_path / "m.zip").exists()
    assert main(["export", "-d", "999", "-f", "0", "-o", str(tmp_path / "m.tar"), *pipeline.flags]) == 2
    assert "zip" in capsys.readouterr().err
    assert main(["export", "-d", "999", "--best", "-o", str(tmp_path / "m.zip"), *pipeline.flags]) == 2
    assert "find_best.json" in capsys.readouterr().err
    # A fold given twice would be averaged twice.
    assert main(["export", "-d", "999", "-c", "3d_fullres", "-f", "0", "0", "-o", str(tmp_path / "m.zip"),
                 *pipeline.flags]) == 2
    assert "fold(s) 0 given twice" in capsys.readouterr().err and not (tmp_path / "m.zip").exists()


def test_find_best_choice_exports_with_its_postprocessing(pipeline, tmp_path):
    import shutil

    results = tmp_path / "res"
    shutil.copytree(pipeline.res, results)
    flags = [f"--raw={pipeline.raw}", f"--preprocessed={pipeline.pre}", f"--results={results}"]
    assert main(["find-best", "-d", "999", "-f", "0", "-np", "1", *flags]) == 0
    target = tmp_path / "best.zip"
    assert main(["export", "-d", "999", "--best", "-o", str(target), *flags]) == 0
    members = _members(target)
    manifest = json.loads(members["model.json"])
    assert [(m["configuration"], m["architecture"], m["folds"]) for m in manifest["models"]] == [
        ("3d_fullres", "unet", ["0"])]
    decision = (results / pipeline.name / "3d_fullres__unet" / "postprocessing.json").read_bytes()
    assert manifest["postprocessing"] and members["postprocessing.json"] == decision
