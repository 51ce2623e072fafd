"""Region-based labels (nnU-Net's nested regions, e.g. BraTS): loss, label writing, and a tiny run end to end."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans, save_plans
from autoseg.inference.predictor import probabilities_to_labels
from autoseg.training.loss import RegionDiceBCELoss, region_masks

# "organ_any" holds both synthetic organs, "organ_b" only the second: nested regions.
REGIONS = {"background": 0, "organ_any": [1, 2], "organ_b": [2]}


def _target() -> torch.Tensor:
    target = torch.zeros(2, 6, 6, 6, dtype=torch.long)
    target[:, 1:3] = 1
    target[:, 3:5] = 2
    return target


def test_region_masks_nest_and_the_loss_rewards_the_right_answer():
    target = _target()
    masks = region_masks(target, [[1, 2], [2]])
    assert torch.equal(masks[:, 0] > 0, target > 0) and torch.equal(masks[:, 1] > 0, target == 2)
    loss = RegionDiceBCELoss([[1, 2], [2]])
    right = (masks * 2 - 1) * 20  # large logits of the right sign
    assert float(loss(right, target)) < 0.01
    assert float(loss(-right, target)) > 1.5
    # Ignored voxels count in neither term: wrong logits there change nothing.
    ignored = target.clone()
    ignored[:, 0] = -1
    wrong_there = right.clone()
    wrong_there[:, :, 0] = 20
    assert float(loss(wrong_there, ignored)) == pytest.approx(float(loss(right, ignored)), abs=1e-6)


def test_region_loss_equals_monais_dice_plus_bce():
    from monai.losses import DiceLoss

    # nnU-Net's region loss: BCE with logits plus batch soft Dice of every region (sigmoid, smooth 1e-5).
    regions = [[1, 2], [2]]
    target = _target()
    logits = torch.randn((2, 2, 6, 6, 6), generator=torch.Generator().manual_seed(0)) * 2
    masks = region_masks(target, regions)
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, masks)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    assert float(RegionDiceBCELoss(regions)(logits, target)) == pytest.approx(float(dice + bce), rel=1e-5)


def test_region_probabilities_write_labels_in_regions_class_order():
    class Plans:  # the two attributes the conversion reads
        has_regions = True
        regions_class_order = [1, 2]

    probabilities = np.zeros((2, 1, 1, 4), dtype=np.float32)
    probabilities[0, 0, 0] = [0.1, 0.9, 0.9, 0.9]  # whole region
    probabilities[1, 0, 0] = [0.9, 0.2, 0.7, 0.6]  # nested region (the first voxel outside "whole")
    # The nested region is drawn after the whole one and wins where both are above 0.5.
    assert probabilities_to_labels(probabilities, Plans()).tolist() == [[[2, 1, 2, 2]]]


def test_a_region_based_dataset_trains_validates_and_predicts(synthetic_raw, tmp_path):
    raw = tmp_path / "raw" / synthetic_raw.name
    shutil.copytree(synthetic_raw, raw)
    meta = json.loads((raw / "dataset.json").read_text())
    meta.update(labels=REGIONS, regions_class_order=[1, 2])
    (raw / "dataset.json").write_text(json.dumps(meta))
    roots = Roots(raw.parent, tmp_path / "pre", tmp_path / "res")
    flags = [f"--raw={roots.raw}", f"--preprocessed={roots.preprocessed}", f"--results={roots.results}"]
    assert main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1", "-a", "unet"] + flags) == 0
    plans = load_plans(roots.plans_file(raw.name))
    assert plans.has_regions and plans.regions == [[1, 2], [2]] and plans.regions_class_order == [1, 2]
    assert plans.num_segmentation_heads == 2  # one sigmoid output per region, no background output
    unet = plans.configurations["3d_fullres"].architectures["unet"]
    unet.patch_size, unet.batch_size = [8, 32, 32], 2
    unet.kernel_sizes, unet.strides, unet.features = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [4, 8, 16]
    save_plans(plans, roots.plans_file(raw.name))
    assert main(["train", "999", "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                 "--num-workers", "0", "--seed", "0"] + flags) == 0
    fold = roots.training_output(raw.name, "3d_fullres", "unet", 0)
    entry = json.loads((fold / "training_log.jsonl").read_text().splitlines()[-1])
    assert len(entry["pseudo_dice"]) == 2  # one per region
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["per_class"]) == {"organ_any", "organ_b"}
    assert main(["predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "out"), "-d", "999", "-c", "3d_fullres",
                 "-f", "0", "--disable-tta", "--save-probabilities"] + flags) == 0
    for written in sorted((tmp_path / "out").glob("*.nii.gz")):
        values = set(np.unique(np.asarray(nib.load(written).dataobj)).tolist())
        assert values <= {0, 1, 2}, (written.name, values)
        probabilities = np.load(written.with_name(written.name.replace(".nii.gz", ".npz")))
        stored = probabilities[probabilities.files[0]]
        assert stored.shape[0] == 2 and stored.min() >= 0 and stored.max() <= 1


def test_dicom_seg_output_of_a_region_based_model_is_refused_before_any_work(tmp_path):
    # The SEG writer makes one segment per written value; nested regions (a core inside the whole tumour) need
    # one of each region's voxels, so its SEG named the edema ring "whole tumour". Refused until written right.
    from pathlib import Path

    from autoseg.errors import UsageError
    from autoseg.inference.folder import predict_folder
    from autoseg.inference.model import TrainedModel
    from autoseg.inference.predictor import PredictionSettings

    plans = load_plans(Path(__file__).resolve().parents[1] / "plans" / "Dataset999_Synthetic.json")
    plans.labels, plans.has_regions, plans.regions_class_order = {"background": 0, "whole": [1, 2], "core": [2]}, \
        True, [1, 2]
    (tmp_path / "in").mkdir()
    model = TrainedModel(plans, "3d_fullres", "unet", [], ["0"])
    with pytest.raises(UsageError, match="DICOM SEG output of region-based models is not supported yet"):
        predict_folder(model, tmp_path / "in", tmp_path / "out", PredictionSettings(), torch.device("cpu"),
                       output_format="dicom-seg")
    assert not (tmp_path / "out").exists()
