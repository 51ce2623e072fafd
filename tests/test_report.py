import json
import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from autoseg.cli import main
from autoseg.evaluation.evaluate import evaluate_folder
from autoseg.fingerprint import compute_fingerprint, save_fingerprint
from autoseg.io.images import Geometry, read_label, write_label
from autoseg.planning.normalization import plan_normalization
from autoseg.report.figures import case_title
from autoseg.report.record import load_report
from autoseg.report.slices import SliceChoice, display_panels, display_transform, to_display
from autoseg.report.window import ct_window, intensity_window
from autoseg.training.progress import draw_progress

LABELS = {"background": 0, "organ_a": 1, "organ_b": 2}
# Shifts along X (voxels) per case: not in name order, so "worst" cannot come from sorting by name.
SHIFTS = {"synth_000": 2, "synth_001": 0, "synth_002": 3, "synth_003": 9, "synth_004": 1, "synth_005": 4}


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def _page(folder: Path) -> ImageSources:
    parser = ImageSources()
    parser.feed((folder / "index.html").read_text(encoding="utf-8"))
    return parser


def _disagreement(case: str, references: Path, predictions: Path) -> np.ndarray:
    reference, _ = read_label(references / f"{case}.nii.gz")
    prediction, _ = read_label(predictions / f"{case}.nii.gz")
    return reference != prediction


@pytest.fixture(scope="module")
def shifted(synthetic_raw, tmp_path_factory):
    """Predictions that are the references shifted along X by SHIFTS, evaluated, and their report."""
    work = tmp_path_factory.mktemp("report")
    references = synthetic_raw / "labelsTr"
    predictions = work / "predictions with space"
    for case, shift in SHIFTS.items():
        label, geometry = read_label(references / f"{case}.nii.gz")
        write_label(np.roll(label, shift, axis=2), predictions / f"{case}.nii.gz", geometry,
                    references / f"{case}.nii.gz")
    flags = [f"--raw={synthetic_raw.parent}", f"--preprocessed={work / 'pre'}", f"--results={work / 'res'}"]
    assert main(["evaluate", str(references), str(predictions), "-d", "999", "-np", "1"] + flags) == 0
    assert main(["report", str(references), str(predictions), "-d", "999", "-np", "2", "-o", str(work / "report"),
                 "--worst", "4"] + flags) == 0
    return SimpleNamespace(references=references, predictions=predictions, report=work / "report", flags=flags)


def test_worst_case_is_the_most_shifted_and_its_panels_cut_through_the_disagreement(shifted):
    record = load_report(shifted.report / "report.json")
    summary = json.loads((shifted.predictions / "summary.json").read_text())
    assert record.metrics_from == [str(shifted.predictions / "summary.json")]  # evaluate's numbers, not new ones
    rows = {row["case"][: -len(".nii.gz")]: row for row in summary["per_case"]}
    assert [c.case_id for c in record.cases][0] == max(SHIFTS, key=SHIFTS.get)
    means = [c.mean_dice for c in record.cases]
    assert means == sorted(means) and len(means) == len(SHIFTS)
    for case in record.cases:
        assert case.dice == {name: rows[case.case_id][f"{name}/dice"] for name in ("organ_a", "organ_b")}
        wrong = _disagreement(case.case_id, shifted.references, shifted.predictions)
        assert case.disagreement_voxels == int(wrong.sum())
        if SHIFTS[case.case_id] == 0:
            assert case.slice_reason == "object centre" and case.mean_dice == 1.0
            reference, _ = read_label(shifted.references / f"{case.case_id}.nii.gz")
            for axis, k in enumerate(case.slice_index):  # every panel passes through the objects
                assert np.take(reference, k, axis=axis).any()
            continue
        assert case.slice_reason == "largest disagreement"
        for axis, k in enumerate(case.slice_index):
            per_slice = wrong.sum(axis=tuple(a for a in range(3) if a != axis))
            # the panel holds disagreement, and among the slices with the most of it
            assert per_slice[k] > 0 and per_slice[k] >= 0.5 * per_slice.max()
        assert sorted(p.split()[0] for p in case.panels) == ["axial", "coronal", "sagittal"]


def test_page_lists_every_case_and_every_image_exists(shifted):
    page = _page(shifted.report)
    html = (shifted.report / "index.html").read_text(encoding="utf-8")
    record = load_report(shifted.report / "report.json")
    for case in SHIFTS:
        assert f">{case}</a>" in html  # in the table of all cases, linked to its figure
    assert {f"cases/{case}.png" for case in SHIFTS} <= set(page.links)
    # box plots + the 4 worst (--worst 4), in rank order
    assert page.images == ["boxplots.png"] + [c.figure for c in record.cases[:4]]
    for src in page.images + page.links:
        assert not src.startswith(("/", "http:", "https:", "file:"))  # relative: the folder can move
        with Image.open(shifted.report / src) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not list(shifted.report.parent.glob(".report.*"))  # the staging folder is gone


def _chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)


def test_page_renders_in_headless_chromium_without_a_broken_image(shifted, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium; .ci/run installs it when root)")
    # A copy of the page beside it (same relative links) with a script that, once everything
    # has loaded, writes each image's natural size into the DOM that --dump-dom prints.
    probe = shifted.report / "_browser_probe.html"
    script = ("<script>window.addEventListener('load', () => { const out = document.createElement('pre');"
              "out.id = 'probe'; out.textContent = JSON.stringify([...document.images].map("
              "i => [i.getAttribute('src'), i.complete, i.naturalWidth])); document.body.appendChild(out); });</script>")
    probe.write_text((shifted.report / "index.html").read_text(encoding="utf-8").replace("</body>", script + "</body>"),
                     encoding="utf-8")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
               probe.as_uri()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, encoding="utf-8",
                               start_new_session=True)
    try:
        dom, _ = process.communicate(timeout=90)
    finally:  # the renderer and GPU processes too, not only the browser
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        probe.unlink()
    assert '<pre id="probe">' in dom, f"chromium printed no result (exit {process.returncode})"
    images = json.loads(dom.split('<pre id="probe">')[1].split("</pre>")[0].replace("&quot;", '"'))
    assert [src for src, _, _ in images] == _page(shifted.report).images
    broken = [src for src, complete, width in images if not complete or width == 0]
    assert images and not broken, f"broken images: {broken}"


def test_a_stale_summary_is_not_trusted_and_bad_input_writes_nothing(shifted, tmp_path, capsys):
    predictions = tmp_path / "predictions"
    shutil.copytree(shifted.predictions, predictions)
    summary = json.loads((predictions / "summary.json").read_text())
    summary["prediction_dir"] = str(predictions)
    (predictions / "summary.json").write_text(json.dumps(summary))
    case = max(SHIFTS, key=SHIFTS.get)
    label, geometry = read_label(shifted.references / f"{case}.nii.gz")
    os.utime(predictions / "summary.json", (1, 1))
    write_label(label, predictions / f"{case}.nii.gz", geometry)  # now perfect, and newer than summary.json
    out = tmp_path / "report"
    assert main(["report", str(shifted.references), str(predictions), "-d", "999", "-np", "1", "-o", str(out)]
                + shifted.flags) == 0
    record = load_report(out / "report.json")
    assert "evaluated now" in record.metrics_from[0] and (out / "summary.json").is_file()
    assert {c.case_id: c.mean_dice for c in record.cases}[case] == 1.0
    before = (out / "index.html").read_bytes()
    capsys.readouterr()

    # A prediction that does not fit its reference: one line naming it, the old report untouched.
    write_label(label[:, :-2, :], predictions / f"{case}.nii.gz",
                Geometry([label.shape[0], label.shape[1] - 2, label.shape[2]], geometry.spacing, geometry.origin,
                         geometry.direction))
    assert main(["report", str(shifted.references), str(predictions), "-d", "999", "-np", "1", "-o", str(out)]
                + shifted.flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{case}.nii.gz" in err[0] and "does not match" in err[0]
    assert (out / "index.html").read_bytes() == before and not list(tmp_path.glob(".report.*"))

    # A missing prediction, and an output folder that holds something else: refused before drawing.
    (predictions / f"{case}.nii.gz").unlink()
    assert main(["report", str(shifted.references), str(predictions), "-d", "999", "-o", str(tmp_path / "new")]
                + shifted.flags) == 2
    assert "no prediction for 1 reference(s)" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["report", str(shifted.references), str(shifted.predictions), "-d", "999", "-o",
                 str(shifted.predictions)] + shifted.flags) == 2
    assert "is not an autoseg report folder" in capsys.readouterr().err


def test_trained_folds_report_their_validation_and_training_curves(synthetic_raw, tmp_path, capsys):
    """The layout training leaves: fold_N/validation/{CASE.nii.gz, summary.json} and fold_N/progress.png."""
    model = tmp_path / "res" / synthetic_raw.name / "3d_fullres__unet"
    for fold, cases in (("0", ["synth_000", "synth_003"]), ("1", ["synth_001"])):
        validation = model / f"fold_{fold}" / "validation"
        references = validation / "references"
        for case in cases:
            label, geometry = read_label(synthetic_raw / "labelsTr" / f"{case}.nii.gz")
            write_label(label, references / f"{case}.nii.gz", geometry)
            write_label(np.where(label == 2, 0, label), validation / f"{case}.nii.gz", geometry)  # organ_b missed
        evaluate_folder(references, validation, LABELS, ".nii.gz", num_processes=1, output_dir=validation,
                        progress=False)
        shutil.rmtree(references)
        if fold == "0":
            draw_progress(model / "fold_0" / "progress.png", [
                dict(epoch=e, train_loss=1.0 / (e + 1), val_loss=1.2 / (e + 1), pseudo_dice_mean=0.1 * e,
                     pseudo_dice_ema=0.08 * e, epoch_seconds=2.0, data_wait_seconds=0.1, lr=0.01) for e in range(3)])
    flags = [f"--raw={synthetic_raw.parent}", f"--preprocessed={tmp_path / 'pre'}", f"--results={tmp_path / 'res'}"]
    assert main(["report", "-d", "999", "-c", "3d_fullres", "-np", "1"] + flags) == 0  # every fold with a validation
    out = model / "report_fold_0_1"
    assert str(out / "index.html") in capsys.readouterr().out
    record = load_report(out / "report.json")
    assert sorted((c.case_id, c.fold) for c in record.cases) == [("synth_000", "0"), ("synth_001", "1"),
                                                                 ("synth_003", "0")]
    assert all(c.dice["organ_b"] == 0.0 and c.hd95["organ_b"] is None for c in record.cases)
    assert all(c.image_file.endswith(f"imagesTr/{c.case_id}_0000.nii.gz") for c in record.cases)
    assert record.per_class["organ_b"].n_undefined_hd95 == 3 and record.per_class["organ_a"].mean["dice"] == 1.0
    assert record.training_curves == {"0": "training/fold_0_progress.png"}  # fold 1 has none: nothing drawn
    assert "training/fold_0_progress.png" in _page(out).images
    assert (out / "training" / "fold_0_progress.png").read_bytes() == (model / "fold_0" / "progress.png").read_bytes()
    assert main(["report", "-d", "999", "-c", "3d_fullres", "-f", "2"] + flags) == 2
    assert "fold_2/validation/summary.json" in capsys.readouterr().err


def _flat_dataset(root: Path, predictions: Path, rgb: bool) -> list[str]:
    """Two 2D cases with a disc: channels in two grey PNGs (0: dim noise, 1: 1000-3009) or in one RGB PNG."""
    names = ["R", "G", "B"] if rgb else ["dim", "bright"]
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": dict(enumerate(names)), "labels": {
        "background": 0, "disc": 1}, "numTraining": 2, "file_ending": ".png"}))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:64, :80]
    for index, centre in enumerate((30, 45)):
        case = f"flat_{index}"
        disc = ((y - 32) ** 2 + (x - centre) ** 2 < 150).astype(np.int64)
        noise = rng.integers(0, 9, (64, 80))
        if rgb:  # green is bright inside the disc, red and blue are dark
            colour = np.stack([noise, 40 + 200 * disc + noise, noise], axis=-1).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(_parent(root / "imagesTr" /
                                                                                       f"{case}_0000.png")))
        else:
            _write_png(root / "imagesTr" / f"{case}_0000.png", noise.astype(np.uint8))
            _write_png(root / "imagesTr" / f"{case}_0001.png", (1000 + 2000 * disc + noise).astype(np.uint16))
        _write_png(root / "labelsTr" / f"{case}.png", disc.astype(np.uint8))
        _write_png(predictions / f"{case}.png", np.roll(disc, 5 * index, axis=1).astype(np.uint8))
    return ["report", str(root / "labelsTr"), str(predictions), "--dataset-json", str(root / "dataset.json"), "-np", "1"]


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_png(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(_parent(path)))


def test_2d_data_draw_one_panel_of_the_chosen_channel_or_in_colour(tmp_path, capsys):
    argv = _flat_dataset(tmp_path / "Dataset123_Grey", tmp_path / "pred_grey", rgb=False)
    assert main(argv + ["--channel", "1", "-o", str(tmp_path / "grey")]) == 0
    record = load_report(tmp_path / "grey" / "report.json")
    assert [c.case_id for c in record.cases] == ["flat_1", "flat_0"]  # flat_0 is perfect
    worst = record.cases[0]
    assert worst.panels == ["2D"] and worst.slice_index[0] == 0 and worst.image_file.endswith("flat_1_0001.png")
    assert 1000 <= worst.window[0] < 1010 and 3000 <= worst.window[1] <= 3009  # channel 1's range, not channel 0's
    assert main(argv + ["--channel", "2", "-o", str(tmp_path / "grey")]) == 2
    assert "--channel 2: the dataset has 2 channel(s)" in capsys.readouterr().err

    argv = _flat_dataset(tmp_path / "Dataset124_Colour", tmp_path / "pred_colour", rgb=True)
    assert main(argv + ["-o", str(tmp_path / "colour")]) == 0  # RGB files: drawn in colour by default
    worst = load_report(tmp_path / "colour" / "report.json").cases[0]
    assert worst.shown == "RGB colour" and worst.window == [0.0, 255.0]
    with Image.open(tmp_path / "colour" / worst.figure) as figure:
        pixels = np.asarray(figure.convert("RGB")).astype(int)
    assert ((pixels[..., 1] - pixels[..., 0] > 100) & (pixels[..., 1] - pixels[..., 2] > 100)).sum() > 500  # green disc
    assert main(argv + ["--channel", "1", "-o", str(tmp_path / "green")]) == 0  # channel 1: the green component
    worst = load_report(tmp_path / "green" / "report.json").cases[0]
    assert worst.shown == "channel 1" and worst.image_file.endswith("flat_1_0000.png") and worst.window[1] >= 240


def test_panels_show_the_patient_the_same_whatever_the_file_direction():
    volume = np.random.default_rng(1).random((5, 6, 7))  # (z, y, x), spacing x 1, y 2, z 3 mm
    identity = Geometry([5, 6, 7], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1, 0, 0, 0, 1, 0, 0, 0, 1])
    # The same anatomy in a file rotated about z: index i runs along -y, index j along +x.
    # Voxel [k, j, i] of that file is voxel [k, 5 - i, j] of the identity file.
    rotated = Geometry([5, 7, 6], [2.0, 1.0, 3.0], [0.0, 10.0, 0.0], [0, 1, 0, -1, 0, 0, 0, 0, 1])
    stored = volume[:, ::-1, :].transpose(0, 2, 1)
    views = []
    for geometry, array, index in ((identity, volume, [2, 3, 4]), (rotated, stored, [2, 4, 5 - 3])):
        perm, flips = display_transform(geometry)
        display = to_display(array, perm, flips)
        panels = display_panels(geometry, SliceChoice(index, "test", 0))
        views.append(([p.name for p in panels], [p.aspect for p in panels], [display[p.rows] for p in panels]))
    (names, aspects, cuts), (names_r, aspects_r, cuts_r) = views
    assert names == names_r == ["axial", "coronal", "sagittal"] and aspects == aspects_r == [2.0, 3.0, 1.5]
    assert all(np.array_equal(a, b) for a, b in zip(cuts, cuts_r))
    assert np.array_equal(cuts[0], volume[2]) and np.array_equal(cuts[1], volume[::-1, 3, :])  # superior on top
    flat = Geometry([6, 7], [1.0, 1.0], [0.0, 0.0], [1, 0, 0, 1])
    assert [p.label for p in display_panels(flat, SliceChoice([0, 2, 3], "test", 0))] == ["2D"]


def test_ct_window_comes_from_the_fingerprint_and_mri_from_each_image(dataset_copy, tmp_path):
    fingerprint = compute_fingerprint(dataset_copy, 1, False)
    fingerprint.channel_names = ["CT"]
    save_fingerprint(fingerprint, tmp_path / "fingerprint.json")
    stats = fingerprint.foreground_intensity[0]
    ct_plans = SimpleNamespace(normalization=plan_normalization(fingerprint))
    ct_plans.normalization[0].clip_low, ct_plans.normalization[0].clip_high = -1000.0, 1000.0  # edited plan
    window = ct_window(0, "CT", ct_plans, tmp_path / "fingerprint.json")
    assert (window.low, window.high) == pytest.approx((stats.percentile_00_5, stats.percentile_99_5), rel=1e-9)
    assert "fingerprint" in window.source
    # Without the fingerprint, the plan's clip window; a plan that says z-score: a window per image.
    assert (ct_window(0, "CT", ct_plans, None).low, ct_window(0, "CT", ct_plans, None).high) == (-1000.0, 1000.0)
    fingerprint.channel_names = ["MRI"]
    assert ct_window(0, "MRI", SimpleNamespace(normalization=plan_normalization(fingerprint)), None) is None
    assert ct_window(0, "ct", None, tmp_path / "fingerprint.json").high == pytest.approx(stats.percentile_99_5)  # name
    image = np.arange(1000, dtype=np.float32)
    low, high, source = intensity_window(image, None)
    assert (low, high) == pytest.approx((np.percentile(image, 0.5), np.percentile(image, 99.5)))
    assert intensity_window(np.zeros(5), None)[:2] == (0.0, 1.0)  # a constant image still gets a window
    rule = ct_window(0, "CT", None, None)  # CT without a fingerprint or plan: the case's own foreground
    foreground = image >= 600
    assert intensity_window(image, rule, foreground)[:2] == pytest.approx(tuple(np.percentile(image[600:], [0.5, 99.5])))


def test_titles_of_many_classes_name_the_worst():
    dice = {f"organ_{i}": 1.0 - i / 10 for i in range(8)}
    hd95 = {name: None if name == "organ_7" else 2.0 for name in dice}
    title = case_title("ct_1", "2", dice, hd95, "largest disagreement")
    text = "\n".join(title)
    assert title[0].startswith("ct_1   mean Dice 0.650   (fold 2)") and "6 worst of 8" in title[0]
    assert "organ_7: Dice 0.300, HD95 undefined" in text and "organ_2:" in text and "organ_1:" not in text
    assert title[-1] == "cut through the largest disagreement"
