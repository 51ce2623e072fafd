"""autoseg pretrain: masked-volume inpainting lowers its loss, continues, and feeds train --pretrained."""

import json
import shutil

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.pretraining.inpainting import MaskedReconstructionLoss, random_cube_mask
from autoseg.pretraining.run import PretrainingOptions, pretrain, pretraining_output
from tests.conftest import preprocess_tiny_synthetic


@pytest.fixture(scope="module")
def planned(synthetic_raw, tmp_path_factory):
    work = tmp_path_factory.mktemp("pretrain")
    roots, _, flags = preprocess_tiny_synthetic(synthetic_raw, work)
    return roots, synthetic_raw.name, flags


def test_the_mask_covers_whole_cubes_and_the_loss_counts_only_masked_voxels():
    torch.manual_seed(0)
    mask = random_cube_mask((64, 1, 16, 32, 32))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0.55 < float(mask.mean()) < 0.65  # MASK_RATIO 0.6 of the cells
    cells = mask[:, :, ::2, ::4, ::4]  # 8 cells per axis of 2x4x4 voxels: constant inside each
    assert torch.equal(mask, cells.repeat_interleave(2, 2).repeat_interleave(4, 3).repeat_interleave(4, 4))
    target = torch.zeros(2, 1, 4, 4, 4)
    reconstruction = torch.zeros_like(target)
    reconstruction[:, :, :2] = 3.0  # wrong only in the first half
    half = torch.zeros_like(target)
    half[:, :, 2:] = 1.0  # ... which is not masked
    assert float(MaskedReconstructionLoss()((reconstruction, half), target)) == 0.0
    assert float(MaskedReconstructionLoss()((reconstruction, 1 - half), target)) == pytest.approx(9.0)


@pytest.mark.slow
def test_pretraining_lowers_the_reconstruction_loss_continues_and_feeds_pretrained(planned, tmp_path, capfd):
    roots, name, flags = planned
    extra = tmp_path / "unlabelled"  # an extra folder of scans without labels: the test images again
    shutil.copytree(roots.raw / name / "imagesTs", extra)
    base = ["pretrain", "-d", "999", "-c", "3d_fullres", "--images", str(extra), "--iters-per-epoch", "12",
            "--epochs", "4", "--seed", "0", *flags]

    class Killed(Exception):
        pass

    class KillAfterTwoEpochs:  # runs after the checkpoint writer: epoch 1 is saved, then the run dies
        def on_epoch_end(self, loop, entry):
            if entry["epoch"] == 1:
                raise Killed

    options = PretrainingOptions(epochs=4, iters_per_epoch=12, extra_image_folders=[extra], seed=0, progress=False)
    with pytest.raises(Killed):
        pretrain(roots, name, "3d_fullres", "unet", options, callbacks=[KillAfterTwoEpochs()])
    output = pretraining_output(roots, name, "3d_fullres", "unet")
    first = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert len(first) == 2 and (output / "progress.png").is_file() and not (output / "checkpoint_final.pt").exists()
    # 6 training + 2 test images from the dataset, 2 from --images
    assert len(list((roots.preprocessed / name).glob("pretrain_*/*.npy"))) == 10
    capfd.readouterr()
    assert main(base + ["--continue"]) == 0
    assert "continuing from epoch 2 of 4" in capfd.readouterr().out
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(4)) and log[:2] == first
    losses = [e["train_loss"] for e in log]
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses  # learns to fill in the masked cubes
    final = torch.load(output / "checkpoint_final.pt", weights_only=True)
    assert final["format"] == "autoseg-pretraining" and final["epoch"] == 4
    # Fine-tuning from it: the reconstruction head is left out, the encoder loads whole.
    heads = final["pretrain_head_names"]
    assert heads and all(h.startswith("net.output_block.") for h in heads)
    assert main(["train", "999", "3d_fullres", "0", "--pretrained", str(output / "checkpoint_final.pt"),
                 "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--num-workers", "0",
                 "--no-validation", *flags]) == 0
    table = json.loads((roots.training_output(name, "3d_fullres", "unet", "0") / "transfer.json").read_text())
    assert {k for k, why in table["unused"].items() if why == "pre-training head"} == set(heads)
    assert table["encoder_tensors_loaded"] == table["encoder_tensors_total"]
