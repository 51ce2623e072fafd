"""DICOM series in, DICOM SEG out: reading, refusals, prediction from DICOM, the SEG read back.

Series are written by SimpleITK (``dicom_series.py``) from a Hippocampus case and from
Dataset030_CTExample; expected values come from the NIfTI files themselves (read by
SimpleITK) and the SEG is read back with highdicom, never by autoseg's own reader alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pydicom = pytest.importorskip("pydicom", reason="the [dicom] extra (pydicom) is not installed")
hd = pytest.importorskip("highdicom", reason="the [dicom] extra (highdicom) is not installed")

from autoseg.cli import main  # noqa: E402
from autoseg.io.dicom import dicom_cases, read_dicom_case  # noqa: E402
from autoseg.io.dicom_seg import SegAlgorithm, read_seg, write_seg  # noqa: E402
from autoseg.io.images import Geometry, read_image, read_label  # noqa: E402
from conftest import shared_dataset, shrink_plan_to_tiny_unet  # noqa: E402
from dicom_series import oblique_direction, write_series  # noqa: E402

CT_UID, HIPPO_UID = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.20"


def _ct_image() -> sitk.Image:
    image = sitk.ReadImage(str(shared_dataset("Dataset030_CTExample") / "imagesTr" / "ct_small_0000.nii.gz"))
    image.SetDirection(oblique_direction())
    return image


def _hippocampus_image() -> sitk.Image:  # a case stored as uint8, so int16 DICOM holds it exactly
    path = shared_dataset("Dataset004_Hippocampus") / "imagesTr" / "hippocampus_033_0000.nii.gz"
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, Path]:
    """Two good series in one folder (shuffled file names) and their NIfTI twins in another."""
    root = tmp_path_factory.mktemp("dicom")
    dicom, nifti = root / "dicom", root / "nifti"
    nifti.mkdir()
    ct, hippocampus = _ct_image(), _hippocampus_image()
    write_series(ct, dicom, CT_UID, patient_id="CT1", shuffle_seed=1, prefix="a")
    write_series(hippocampus, dicom, HIPPO_UID, patient_id="HIP1", modality="MR", shuffle_seed=2, prefix="b",
                 description="hippocampus T1")
    sitk.WriteImage(ct, str(nifti / "CT1_20240102_1_0000.nii.gz"))
    sitk.WriteImage(hippocampus, str(nifti / "HIP1_20240102_1_0000.nii.gz"))
    return dicom, nifti


def test_series_read_from_a_mixed_shuffled_folder_equal_their_nifti(mixed_folder):
    dicom, nifti = mixed_folder
    listing = dicom_cases(dicom, 1)
    cases, refused = listing.cases, listing.refused_lines()
    assert refused == []
    assert [c.case_id for c in cases] == ["CT1_20240102_1", "HIP1_20240102_1"]
    for case in cases:
        array, geometry = read_dicom_case(case, 1)
        expected, expected_geometry = read_image(nifti / f"{case.case_id}_0000.nii.gz")
        assert np.array_equal(array, expected)
        assert geometry.shape == expected_geometry.shape
        # Spacing from the positions (the files claim SliceThickness 99), direction oblique.
        assert np.allclose(geometry.spacing, expected_geometry.spacing, atol=1e-6)
        assert np.allclose(geometry.origin, expected_geometry.origin, atol=1e-4)
        assert np.allclose(geometry.direction, expected_geometry.direction, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    image = _ct_image()
    files = write_series(image, tmp_path / "series", CT_UID)
    hu = sitk.GetArrayFromImage(image).astype(np.int32)
    for index, path in enumerate(files):  # stored values shifted and halved, as a scanner may store them
        ds = pydicom.dcmread(path)
        slope = 2 if index % 2 else 1
        stored = (hu[index] + 2048) // slope
        ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 0, -2048, slope
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(path)
    expected = np.stack([((hu[i] + 2048) // (2 if i % 2 else 1)) * (2 if i % 2 else 1) - 2048
                         for i in range(len(files))])
    cases = dicom_cases(tmp_path / "series", 1).cases
    array, _ = read_dicom_case(cases[0], 1)
    assert np.array_equal(array[0], expected.astype(np.float32))


def _defective_folder(root: Path) -> dict[str, str]:
    """Series that must be refused, by UID, with the words the reason must contain."""
    ct = _ct_image()
    missing = write_series(ct, root / "missing", "9.1", series_number=11)
    missing[12].unlink()
    write_series(ct, root / "tilted", "9.2", series_number=12, tilt_mm_per_slice=0.8)
    mixed = write_series(ct, root / "mixed", "9.3", series_number=13)
    ds = pydicom.dcmread(mixed[5])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(mixed[5])
    duplicated = write_series(ct, root / "duplicated", "9.4", series_number=14)
    ds = pydicom.dcmread(duplicated[3])
    ds.ImagePositionPatient = pydicom.dcmread(duplicated[4]).ImagePositionPatient
    ds.save_as(duplicated[3])
    return {"9.1": "missing slice", "9.2": "gantry tilt", "9.3": "mixed orientations", "9.4": "duplicated slices"}


def test_defective_series_are_refused_by_name(tmp_path):
    reasons = _defective_folder(tmp_path)
    listing = dicom_cases(tmp_path, 1)
    cases, refused = listing.cases, listing.refused_lines()
    assert cases == []
    for uid, words in reasons.items():
        assert [line for line in refused if f"series {uid} " in line and words in line], (uid, refused)


@pytest.fixture(scope="module")
def model_flags(synthetic_raw, tmp_path_factory) -> list[str]:
    """A tiny one-channel U-Net with random weights, from the committed plan of the synthetic dataset (labels 1
    and 2), at 3 mm so that the CT is predicted at its own spacing and quickly."""
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans, save_plans

    plans = load_plans(Path(__file__).resolve().parents[1] / "plans" / "Dataset999_Synthetic.json")
    results = tmp_path_factory.mktemp("results")
    fold = results / synthetic_raw.name / "3d_fullres__unet" / "fold_0"
    fold.mkdir(parents=True)
    plans.configurations["3d_fullres"].spacing = [3.0, 3.0, 3.0]
    save_plans(plans, fold / "plans.json")
    shrink_plan_to_tiny_unet(fold / "plans.json")
    plans = load_plans(fold / "plans.json")
    torch.manual_seed(0)
    network = build_network(plans.architecture("3d_fullres"), 1, 3, 3, deep_supervision=True)
    torch.save({"model": network.state_dict()}, fold / "checkpoint_final.pt")
    save_plans(plans, fold / "plans.json")
    return ["-d", "999", "-c", "3d_fullres", "-f", "0", "--disable-tta", "--fp32", "--step", "1",
            f"--raw={synthetic_raw.parent}",
            f"--preprocessed={results.parent / 'pre'}", f"--results={results}"]


@pytest.mark.slow
def test_predicting_dicom_equals_predicting_nifti_and_the_seg_holds_the_same_masks(mixed_folder, model_flags,
                                                                                      tmp_path, capsys):
    dicom, nifti = mixed_folder
    work = tmp_path / "in"
    shutil.copytree(dicom, work)
    reasons = _defective_folder(work / "bad")
    code = main(["predict", "-i", str(work), "-o", str(tmp_path / "from_dicom"), "--output-format", "both",
                 *model_flags])
    err = capsys.readouterr().err
    assert code == 2  # some series were refused ...
    for uid in reasons:
        assert f"series {uid} " in err
    assert main(["predict", "-i", str(nifti), "-o", str(tmp_path / "from_nifti"), *model_flags]) == 0
    rows = (tmp_path / "from_dicom" / "cases.csv").read_text().splitlines()
    assert rows[1].startswith(f"CT1_20240102_1,0,{CT_UID},") and rows[2].startswith(f"HIP1_20240102_1,0,{HIPPO_UID},")
    found = set()
    for case, uid in (("CT1_20240102_1", CT_UID), ("HIP1_20240102_1", HIPPO_UID)):  # ... the others are written
        from_dicom, geometry = read_label(tmp_path / "from_dicom" / f"{case}.nii.gz")
        from_nifti, nifti_geometry = read_label(tmp_path / "from_nifti" / f"{case}.nii.gz")
        assert np.array_equal(from_dicom, from_nifti)
        found |= set(np.unique(from_nifti).tolist())
        assert geometry.matches(nifti_geometry, 1e-6, 1e-4, 1e-6) == []
        seg = hd.seg.segread(tmp_path / "from_dicom" / f"{case}.dcm")
        sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in (work).glob("*.dcm")),
                         key=lambda d: int(d.InstanceNumber))
        sources = [d for d in sources if d.SeriesInstanceUID == uid]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
        assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["organ_a", "organ_b"]
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "autoseg" and seg.SegmentationType == "BINARY"
        # InstanceNumber i is slice i of the image (written so by SimpleITK from the NIfTI's index).
        masks = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in sources], combine_segments=True,
                                                  relabel=False)
        assert np.array_equal(masks, from_nifti)
    assert found == {0, 1, 2}  # the random network predicts every class somewhere, so the masks are not trivial


@pytest.mark.slow
def test_the_parts_of_a_job_array_share_one_complete_cases_csv_and_one_bad_series_fails_one_part(
        mixed_folder, model_flags, tmp_path):
    dicom, _ = mixed_folder
    work = tmp_path / "in"
    shutil.copytree(dicom, work)
    _defective_folder(work / "bad")
    codes = [main(["predict", "-i", str(work), "-o", str(tmp_path / "out"), "--part", f"{k}/2", *model_flags])
             for k in (2, 1)]
    assert codes == [0, 2]  # the refused series are part 1's failure; part 2 predicted its case
    rows = (tmp_path / "out" / "cases.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["CT1_20240102_1", "HIP1_20240102_1"]  # not part 1's alone
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["CT1_20240102_1.nii.gz",
                                                                          "HIP1_20240102_1.nii.gz"]


def test_seg_of_a_many_class_ct_reads_back_voxel_identical_at_the_source_positions(mixed_folder, tmp_path):
    dicom, _ = mixed_folder
    dataset = shared_dataset("Dataset030_CTExample")
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / "ct_small.nii.gz")))
    truth[truth == 5] = 0  # one class absent: still described, with empty frames
    series = next(c for c in dicom_cases(dicom, 1).cases if c.case_id.startswith("CT1")).channels[0]
    names = {v: k for k, v in labels.items() if k != "background"}
    write_seg(truth, series, names, SegAlgorithm("Dataset030_CTExample", ["3d_fullres__unet"], ["0"]),
              tmp_path / "ct.dcm")
    seg = hd.seg.segread(tmp_path / "ct.dcm")
    assert len(seg.SegmentSequence) == len(names)
    by_number = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame sits where its source slice is
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = next(s for s in sources if s.SOPInstanceUID == source_uid)
        assert np.allclose(frame.PlanePositionSequence[0].ImagePositionPatient, source.ImagePositionPatient)
    masks = seg.get_pixels_by_source_instance([str(s.SOPInstanceUID) for s in sources], combine_segments=False)
    order = [int(s.InstanceNumber) - 1 for s in sources]  # slice index of each source file
    for number, name in by_number.items():
        assert np.array_equal(masks[..., number - 1].astype(bool), truth[order] == labels[name]), name
    array, geometry = read_seg(tmp_path / "ct.dcm", labels)
    assert np.array_equal(array, truth) and geometry.matches(series.geometry) == []


def test_multi_channel_models_need_dicom_channels(mixed_folder, tmp_path):
    from autoseg.errors import UsageError

    dicom, _ = mixed_folder
    with pytest.raises(UsageError, match="--dicom-channels"):
        dicom_cases(dicom, 2)
    # Both series in one study: two patterns pick one each; a pattern matching nothing refuses the study.
    listing = dicom_cases(dicom, 2, ["test*", "*HIPPO*"])
    cases, refused = listing.cases, listing.refused_lines()
    assert refused == [] and [[s.uid for s in c.channels] for c in cases] == [[CT_UID, HIPPO_UID]]
    listing = dicom_cases(dicom, 2, ["test*", "*flair*"])
    cases, refused = listing.cases, listing.refused_lines()
    assert cases == [] and refused[0].startswith(f"{listing.refused[0].file}: study ")
    assert "refused: pattern '*flair*' matches 0 series" in refused[0]


def test_a_missing_extra_says_what_to_install(monkeypatch, mixed_folder):
    import sys

    from autoseg.errors import UsageError

    monkeypatch.setitem(sys.modules, "pydicom", None)  # what an install without the extra sees: ImportError
    with pytest.raises(UsageError, match=r"pip install 'autoseg\[dicom\]'"):
        dicom_cases(mixed_folder[0], 1)


def test_objects_that_are_no_images_are_passed_over_with_a_note_not_refused(mixed_folder, tmp_path, capsys):
    # A SEG (or SR, KO, ...) beside the images is in almost every export: refusing it failed every run.
    dicom, _ = mixed_folder
    shutil.copytree(dicom, tmp_path / "export")
    ct_files = sorted(dicom.glob("a*.dcm"))
    labels = np.zeros((len(ct_files), *pydicom.dcmread(ct_files[0]).pixel_array.shape), dtype=np.uint8)
    labels[2, 5:9, 5:9] = 1
    _highdicom_seg(ct_files, labels, {1: "spleen"}, tmp_path / "export" / "seg.dcm")
    # A scout (three slices, one turned: refused as mixed orientations if taken for a volume) and a dose report
    # screenshot (Modality CT, no position), as CT exports hold them.
    scout = write_series(_hippocampus_image()[:, :, :3], tmp_path / "export" / "scout", "9.7", series_number=2)
    for index, path in enumerate(scout):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        if index == 1:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(path)
    ds = pydicom.dcmread(ct_files[0])
    ds.SOPClassUID, ds.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "9.8"
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(tmp_path / "export" / "dose_report.dcm")
    listing = dicom_cases(tmp_path / "export", 1)
    cases, refused = listing.cases, listing.refused_lines()
    assert refused == [] and len(cases) == 2
    assert sorted(s.not_an_image for s in listing.passed_over) == [
        "Modality SEG", "localizer", "secondary capture without a position"]
    assert ("3 DICOM series that are no images passed over (Modality SEG, localizer, secondary capture without a "
            "position)") in capsys.readouterr().err


def test_evaluate_accepts_seg_predictions_and_references(mixed_folder, tmp_path, capsys):
    dicom, nifti = mixed_folder
    dataset = shared_dataset("Dataset030_CTExample")
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    ct = sitk.ReadImage(str(nifti / "CT1_20240102_1_0000.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / "ct_small.nii.gz")))
    shifted = np.roll(truth, 1, axis=2)  # a prediction one voxel off
    folders = {name: tmp_path / name for name in ("ref_nifti", "pred_nifti", "pred_seg", "ref_seg")}
    for name, array in (("ref_nifti", truth), ("pred_nifti", shifted)):
        folders[name].mkdir()
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(ct)
        sitk.WriteImage(image, str(folders[name] / "CT1_20240102_1.nii.gz"))
    series = next(c for c in dicom_cases(dicom, 1).cases if c.case_id.startswith("CT1")).channels[0]
    names = {v: k for k, v in labels.items() if k != "background"}
    algorithm = SegAlgorithm("Dataset030_CTExample", ["3d_fullres__unet"], ["0"])
    folders["pred_seg"].mkdir()
    folders["ref_seg"].mkdir()
    write_seg(shifted, series, names, algorithm, folders["pred_seg"] / "CT1_20240102_1.dcm")
    shutil.copy(folders["pred_seg"] / "CT1_20240102_1.dcm", folders["ref_seg"])
    flags = ["--dataset-json", str(dataset / "dataset.json"), "-np", "1"]
    summaries = {}
    for reference, prediction in (("ref_nifti", "pred_nifti"), ("ref_nifti", "pred_seg"), ("ref_seg", "ref_nifti")):
        out = tmp_path / f"eval_{reference}_{prediction}"
        assert main(["evaluate", str(folders[reference]), str(folders[prediction]), "-o", str(out), *flags]) == 0
        summaries[prediction] = json.loads((out / "summary.json").read_text())["per_case"][0]
    for name in ("class_1", "class_10", "class_52"):  # Dice from numpy, independently
        a, b = truth == labels[name], shifted == labels[name]
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        for row in summaries.values():
            assert row[f"{name}/dice"] == pytest.approx(dice, abs=1e-9)
    for key, value in summaries["pred_nifti"].items():  # every metric equal whatever the format
        if key != "case":
            assert summaries["pred_seg"][key] == pytest.approx(value, abs=1e-9)
            assert summaries["ref_nifti"][key] == pytest.approx(value, abs=1e-6), key  # metrics are symmetric
    # A reference SEG written as most tools write it, empty frames left out, covers only the annotated slices
    # on its own: it is placed on the prediction's grid (it ended in "does not match its reference").
    sparse = tmp_path / "ref_seg_sparse"
    sparse.mkdir()
    _highdicom_seg(series.files, shifted, names, sparse / "CT1_20240102_1.dcm")
    assert int(hd.seg.segread(sparse / "CT1_20240102_1.dcm").NumberOfFrames) < len(series.files) * len(names)
    out = tmp_path / "eval_sparse"
    assert main(["evaluate", str(sparse), str(folders["ref_nifti"]), "-o", str(out), *flags]) == 0
    row = json.loads((out / "summary.json").read_text())["per_case"][0]
    assert {k: v for k, v in row.items() if k != "case"} == pytest.approx(
        {k: v for k, v in summaries["ref_nifti"].items() if k != "case"}, abs=1e-9)


def _highdicom_seg(series_files: list[Path], labels_zyx: np.ndarray, names: dict[int, str], path: Path) -> None:
    """A SEG written by highdicom directly (empty frames omitted, as most tools do), not by autoseg."""
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(f) for f in series_files), key=lambda d: int(d.InstanceNumber))
    values = sorted(names)
    segment_numbers = np.zeros_like(labels_zyx, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        segment_numbers[labels_zyx == value] = number
    algorithm = hd.AlgorithmIdentificationSequence("test", codes.cid7162.ArtificialIntelligence, "1")
    descriptions = [hd.seg.SegmentDescription(n, names[v], codes.SCT.Tissue, codes.SCT.Tissue, "AUTOMATIC", algorithm)
                    for n, v in enumerate(values, start=1)]
    seg = hd.seg.Segmentation(sources, segment_numbers, "BINARY", descriptions, hd.UID(), 2, hd.UID(), 1, "test",
                              "test", "1", "1")
    seg.save_as(path)


@pytest.mark.parametrize("slices", [(2, 3, 7), (0, 5, 10)], ids=["gaps", "every-fifth"])
def test_a_seg_with_gaps_between_its_annotated_slices_is_placed_slice_by_slice(mixed_folder, tmp_path, slices):
    # Writers omit empty frames, so the frames of a structure drawn on slices 2-3 and 7, or on every fifth
    # slice, have gaps. highdicom's own SEGs say SpacingBetweenSlices; where a writer left it out, the frames
    # of every fifth slice read as a stack of five times the image's spacing, which was refused.
    dicom, _ = mixed_folder
    series = next(c for c in dicom_cases(dicom, 1).cases if c.case_id.startswith("CT1")).channels[0]
    labels = np.zeros(series.geometry.shape, dtype=np.uint8)
    for index, z in enumerate(slices):
        labels[z, 3 + index:9, 4:10 - index] = 1
    ct_files = sorted(dicom.glob("a*.dcm"))
    _highdicom_seg(ct_files, labels, {1: "spleen"}, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert int(ds.NumberOfFrames) == len(slices)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
    ds.save_as(tmp_path / "seg.dcm")
    alone, alone_geometry = read_seg(tmp_path / "seg.dcm", {"spleen": 1})  # its own grid: the smallest gap
    smallest_gap = min(np.diff(slices))
    assert alone.shape[0] == (slices[-1] - slices[0]) // smallest_gap + 1
    assert alone_geometry.spacing[2] == pytest.approx(smallest_gap * series.geometry.spacing[2], rel=1e-6)
    array, geometry = read_seg(tmp_path / "seg.dcm", {"spleen": 1}, onto=series.geometry)
    assert geometry == series.geometry and np.array_equal(array, labels)


def test_a_seg_whose_frames_make_no_regular_stack_is_placed_frame_by_frame_onto_the_image(mixed_folder, tmp_path):
    # Slices 0, 2 and 5 drawn, SpacingBetweenSlices left out: gaps of 2 and 3 slices are no volume to highdicom
    # (alone the SEG is refused so), but onto the image every frame has its slice.
    dicom, _ = mixed_folder
    series = next(c for c in dicom_cases(dicom, 1).cases if c.case_id.startswith("CT1")).channels[0]
    labels = np.zeros(series.geometry.shape, dtype=np.uint8)
    labels[0, 2:6, 3:9], labels[2, 4:8, 1:4], labels[5, 6:9, 6:9] = 1, 2, 1
    labels[5, 2:4, 2:4] = 2
    _highdicom_seg(sorted(dicom.glob("a*.dcm")), labels, {1: "spleen", 2: "liver"}, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
    ds.save_as(tmp_path / "seg.dcm")
    from autoseg.errors import ImageReadError

    with pytest.raises(ImageReadError, match="do not form one regular 3D grid"):
        read_seg(tmp_path / "seg.dcm", {"spleen": 1, "liver": 2})
    array, geometry = read_seg(tmp_path / "seg.dcm", {"spleen": 1, "liver": 2}, onto=series.geometry)
    assert geometry == series.geometry and np.array_equal(array, labels)
    shifted = Geometry(series.geometry.shape, series.geometry.spacing, [v + 0.4 for v in series.geometry.origin],
                       series.geometry.direction)
    with pytest.raises(ImageReadError, match="frame 1 does not lie on a slice of the image's grid"):
        read_seg(tmp_path / "seg.dcm", {"spleen": 1, "liver": 2}, onto=shifted)


def test_convert_dicom_round_trip_gives_back_the_labels_and_lists_unmapped_segments(mixed_folder, tmp_path, capsys):
    dicom, nifti = mixed_folder
    dataset = shared_dataset("Dataset030_CTExample")
    truth_file = dataset / "labelsTr" / "ct_small.nii.gz"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file)))
    names = {1: "spleen", 2: "kidney right", 3: "kidney left", 10: "lung"}
    kept = np.where(np.isin(truth, list(names)), truth, 0)
    (tmp_path / "labels").mkdir()
    _highdicom_seg([f for f in dicom.glob("a*.dcm")], kept, names, tmp_path / "labels" / "ct_seg.dcm")
    # The labels folder may be the whole export, images beside the SEGs (each image was refused as "not a SEG").
    shutil.copytree(dicom, tmp_path / "labels" / "export")
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({"spleen": 1, "kidney right": 2, "lung": 10}))
    # The images: the CT and the MR of the fixture, and a second CT without a SEG (a test case).
    images = tmp_path / "images"
    shutil.copytree(dicom, images)
    write_series(_hippocampus_image(), images / "second_ct", "9.9", patient_id="CT2")
    target = tmp_path / "raw" / "Dataset050_Mine"
    command = ["convert-dicom", str(images), str(tmp_path / "labels"), "-o", str(target), "--labels", str(mapping)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "['kidney left'] are not in labels.json" in err and not target.exists()
    # One channel holds one kind of image: a CT and MR export is refused unless --modality picks one.
    assert "the image series are of several modalities: CT (2 series, e.g. CT1_20240102_1), MR (1 series" in err
    assert "--modality CT" in err
    mapping.write_text(json.dumps({"spleen": 1, "kidney right": 2, "kidney left": 3, "lung": 10}))
    assert main([*command, "--modality", "pt"]) == 2
    assert "no image series of modality PT (found: CT (2 series" in capsys.readouterr().err and not target.exists()
    assert main([*command, "--modality", "CT"]) == 0
    assert "1 series of modalities other than CT left out (MR)" in capsys.readouterr().err
    label, geometry = read_label(target / "labelsTr" / "CT1_20240102_1.nii.gz")
    image, image_geometry = read_image(target / "imagesTr" / "CT1_20240102_1_0000.nii.gz")
    expected_image, expected_geometry = read_image(nifti / "CT1_20240102_1_0000.nii.gz")
    assert np.array_equal(label, kept) and np.array_equal(image, expected_image)
    assert geometry == image_geometry and geometry.matches(expected_geometry, 1e-6, 1e-4, 1e-6) == []
    assert sorted(p.name for p in (target / "imagesTs").iterdir()) == ["CT2_20240102_1_0000.nii.gz"]  # no SEG
    description = json.loads((target / "dataset.json").read_text())
    assert description["labels"] == {"background": 0, "spleen": 1, "kidney right": 2, "kidney left": 3, "lung": 10}
    assert description["numTraining"] == 1 and description["channel_names"] == {"0": "CT"}
    assert main(["check", "-d", "50", f"--raw={tmp_path / 'raw'}", "-np", "1"]) == 0


def test_convert_dicom_with_channels_writes_a_file_per_channel_and_takes_the_seg_of_any_channel(tmp_path, capsys):
    # A multi-sequence MR export (T1 and T2 of each study): one case per study, one file per channel, the SEG
    # drawn on the T2 (the second channel).
    t1 = _hippocampus_image()
    t2 = sitk.Cast(t1 * 2 + 7, sitk.sitkInt16)  # another contrast on the same grid
    images, labels_dir = tmp_path / "images", tmp_path / "labels"
    write_series(t1, images / "t1", "7.1", patient_id="MR1", series_number=3, description="T1 axial", modality="MR")
    t2_files = write_series(t2, images / "t2", "7.2", patient_id="MR1", series_number=4, description="T2 axial",
                            modality="MR")
    moved = sitk.Image(t2)  # a second study whose T2 lies 1.5 mm off its T1's grid
    moved.SetOrigin([v + 1.5 for v in t2.GetOrigin()])
    write_series(t1, images / "other_t1", "7.3", study_uid="1.2.3.2", patient_id="MR2", description="T1 axial",
                 modality="MR")
    write_series(moved, images / "other_t2", "7.4", study_uid="1.2.3.2", patient_id="MR2", description="T2 axial",
                 modality="MR")
    truth_file = shared_dataset("Dataset004_Hippocampus") / "labelsTr" / "hippocampus_033.nii.gz"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file)))
    labels_dir.mkdir()
    _highdicom_seg(t2_files, truth, {1: "anterior", 2: "posterior"}, labels_dir / "t2_seg.dcm")
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({"anterior": 1, "posterior": 2}))
    target = tmp_path / "raw" / "Dataset053_Channels"
    command = ["convert-dicom", str(images), str(labels_dir), "-o", str(target), "--labels", str(mapping),
               "--dicom-channels", "*T1*", "*T2*"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "series 7.4 (T2 axial" in err and "does not lie on the grid of case MR2_20240102_1's first channel" in err
    assert not target.exists()
    shutil.rmtree(images / "other_t2")  # the second study now has no T2: refused by name, the first converted
    assert main(command) == 2
    assert "study 1.2.3.2 refused: pattern '*T2*' matches 0 series" in capsys.readouterr().err
    for index, expected in enumerate((t1, t2)):
        image, geometry = read_image(target / "imagesTr" / f"MR1_20240102_3_{index:04d}.nii.gz")
        assert np.array_equal(image[0], sitk.GetArrayFromImage(expected))
        assert np.allclose(geometry.spacing, expected.GetSpacing(), atol=1e-6)
        assert np.allclose(geometry.origin, expected.GetOrigin(), atol=1e-4)
    label, label_geometry = read_label(target / "labelsTr" / "MR1_20240102_3.nii.gz")
    assert np.array_equal(label, truth) and label_geometry == geometry
    description = json.loads((target / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "T1", "1": "T2"} and description["numTraining"] == 1
    assert main(["check", "-d", "53", f"--raw={tmp_path / 'raw'}", "-np", "1"]) == 0


def test_a_label_mapping_may_not_use_the_names_dataset_json_reserves_or_a_value_twice(tmp_path):
    from autoseg.dataset.dicom_convert import read_label_mapping
    from autoseg.errors import DatasetError

    for mapping, problem in (({"background": 3, "liver": 1}, "'background' is a name dataset.json reserves"),
                             ({"liver": 1, "ignore": 2}, "'ignore' is a name dataset.json reserves"),
                             ({"liver": 1, "spleen": 1}, "the same value")):
        (tmp_path / "labels.json").write_text(json.dumps(mapping))
        with pytest.raises(DatasetError, match=problem):
            read_label_mapping(tmp_path / "labels.json")
    (tmp_path / "labels.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    assert read_label_mapping(tmp_path / "labels.json") == {"liver": 1, "spleen": 2}


def test_rounded_orientation_cosines_and_anisotropic_spacing_read_as_the_nifti_geometry(tmp_path):
    # Scanners write the cosines rounded, up to 1e-3 off unit length (accepted): the slice normal taken from
    # them unnormalised moved every slice off its line by 8e-4 of its distance from the first (0.06 mm here),
    # and the series was refused as a gantry tilt; the direction was no rotation either. The spacing differs
    # on every axis, so that swapping the row and column spacing, or the slice spacing, shows.
    image = _ct_image()
    image.SetSpacing((0.7, 0.9, 2.5))
    files = write_series(image, tmp_path / "series", CT_UID)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [f"{float(v) * 1.0004:.10g}" for v in ds.ImageOrientationPatient]
        ds.save_as(path)
    listing = dicom_cases(tmp_path / "series", 1)
    cases, refused = listing.cases, listing.refused_lines()
    assert refused == []
    array, geometry = read_dicom_case(cases[0], 1)
    assert np.array_equal(array[0], sitk.GetArrayFromImage(image))
    assert np.allclose(geometry.spacing, image.GetSpacing(), atol=1e-6)
    assert np.allclose(geometry.direction, image.GetDirection(), atol=1e-6)
    assert np.allclose(geometry.origin, image.GetOrigin(), atol=1e-4)


def test_a_slice_with_blank_or_malformed_placement_values_refuses_its_series_naming_the_file(mixed_folder, tmp_path):
    # Anonymisers blank such values; a blank orientation crashed the whole folder ("internal error").
    dicom, _ = mixed_folder
    export = tmp_path / "export"
    shutil.copytree(dicom, export)
    blank, single = sorted(export.glob("a*.dcm"))[3], sorted(export.glob("b*.dcm"))[2]
    for path, key, value in ((blank, "ImageOrientationPatient", ""), (single, "PixelSpacing", "0.5")):
        ds = pydicom.dcmread(path)
        setattr(ds, key, value)
        ds.save_as(path)
    listing = dicom_cases(export, 1)
    cases, refused = listing.cases, listing.refused_lines()
    assert cases == [] and len(refused) == 2
    assert f"series {CT_UID} " in refused[0]
    assert f"{blank.name}: ImageOrientationPatient is missing or empty" in refused[0]
    assert f"series {HIPPO_UID} " in refused[1] and f"{single.name}: PixelSpacing [0.5] is not 2 " in refused[1]


def test_seg_of_an_anonymised_series_is_written_and_one_without_frame_of_reference_refused(mixed_folder, tmp_path):
    from autoseg.errors import AutosegError

    dicom, _ = mixed_folder
    export = tmp_path / "export"
    shutil.copytree(dicom, export)
    deleted = 0
    for path in export.glob("a*.dcm"):  # type-2 attributes highdicom copies, deleted as anonymisers do
        ds = pydicom.dcmread(path)
        for key in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyTime"):
            if key in ds:
                delattr(ds, key)
                deleted += 1
        ds.save_as(path)
    assert deleted >= 2 * len(list(export.glob("a*.dcm")))
    series = next(c for c in dicom_cases(export, 1).cases if c.case_id.startswith("CT1")).channels[0]
    labels = np.zeros(series.geometry.shape, dtype=np.int16)
    labels[2, 5:9, 5:9], labels[4, 1:3, 1:6] = 1, 2
    long_name = "left " + "very " * 14 + "long structure name"  # over the 64 characters of a SegmentLabel
    names = {1: "spleen", 2: long_name}
    write_seg(labels, series, names, SegAlgorithm("Dataset999", ["3d_fullres__unet"], ["0"]), tmp_path / "a.dcm")
    assert [s.SegmentLabel for s in hd.seg.segread(tmp_path / "a.dcm").SegmentSequence] == ["spleen", long_name[:64]]
    array, _ = read_seg(tmp_path / "a.dcm", {"spleen": 1, long_name: 2}, onto=series.geometry)
    assert np.array_equal(array, labels)
    with pytest.raises(AutosegError, match="share their first 64 characters"):
        write_seg(labels, series, {1: long_name + " a", 2: long_name + " b"}, SegAlgorithm("D", ["m"]),
                  tmp_path / "clash.dcm")
    for path in series.files:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    with pytest.raises(AutosegError, match=f"series {series.uid} .*no FrameOfReferenceUID, which a DICOM SEG"):
        write_seg(labels, series, names, SegAlgorithm("D", ["m"]), tmp_path / "b.dcm")
    assert not (tmp_path / "b.dcm").exists() and not (tmp_path / "clash.dcm").exists()


def test_convert_dicom_says_why_the_series_a_seg_references_was_refused(mixed_folder, tmp_path, capsys):
    dicom, _ = mixed_folder
    ct_files = sorted(dicom.glob("a*.dcm"))
    labels = np.zeros((len(ct_files), *pydicom.dcmread(ct_files[0]).pixel_array.shape), dtype=np.uint8)
    labels[2, 5:9, 5:9] = 1
    (tmp_path / "labels").mkdir()
    _highdicom_seg(ct_files, labels, {1: "spleen"}, tmp_path / "labels" / "seg.dcm")
    images = tmp_path / "images"
    images.mkdir()
    for path in ct_files:
        if int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber) != 15:  # a slice lost in transfer
            shutil.copy(path, images)
    # A SEG drawn on a localizer (no volume to segment) is told so, not "not among the series found".
    scout = write_series(_hippocampus_image()[:, :, :3], images / "scout", "9.7", series_number=2)
    for path in scout:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    scout_labels = np.zeros((3, *pydicom.dcmread(scout[0]).pixel_array.shape), dtype=np.uint8)
    scout_labels[1, 2:5, 2:5] = 1
    _highdicom_seg(scout, scout_labels, {1: "spleen"}, tmp_path / "labels" / "scout_seg.dcm")
    (tmp_path / "labels.json").write_text(json.dumps({"spleen": 1}))
    target = tmp_path / "raw" / "Dataset051_Lost"
    assert main(["convert-dicom", str(images), str(tmp_path / "labels"), "-o", str(target),
                 "--labels", str(tmp_path / "labels.json")]) == 2
    err = capsys.readouterr().err
    assert f"references series {CT_UID}, which was refused: missing slice" in err, err
    assert "references series 9.7, which is no image to segment (localizer) and was passed over" in err, err
    assert not target.exists()


def test_convert_dicom_refuses_a_seg_drawn_on_a_moved_copy_of_its_series(mixed_folder, tmp_path, capsys):
    # highdicom is asked to ignore SpatialLocationsPreserved (most writers leave it out), so an explicit NO was
    # taken too: frames drawn on a resampled or flipped copy were pasted onto the source slices unchanged.
    dicom, _ = mixed_folder
    ct_files = sorted(dicom.glob("a*.dcm"))
    labels = np.zeros((len(ct_files), *pydicom.dcmread(ct_files[0]).pixel_array.shape), dtype=np.uint8)
    labels[2, 5:9, 5:9] = 1
    seg_file = tmp_path / "labels" / "seg.dcm"
    seg_file.parent.mkdir()
    _highdicom_seg(ct_files, labels, {1: "spleen"}, seg_file)
    ds = pydicom.dcmread(seg_file)
    source = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    source.SpatialLocationsPreserved = "NO"
    ds.save_as(seg_file)
    images = tmp_path / "images"
    images.mkdir()
    for path in ct_files:
        shutil.copy(path, images)
    (tmp_path / "labels.json").write_text(json.dumps({"spleen": 1}))
    target = tmp_path / "raw" / "Dataset052_Moved"
    assert main(["convert-dicom", str(images), str(seg_file.parent), "-o", str(target),
                 "--labels", str(tmp_path / "labels.json")]) == 2
    err = capsys.readouterr().err
    assert f"{seg_file}: its frames say SpatialLocationsPreserved NO" in err, err
    assert not target.exists()
