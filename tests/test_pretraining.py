"""autoseg pretrain: masked-volume inpainting, and Swin UNETR's inpainting + rotation + contrastive tasks, lower
their loss, continue, and feed train --pretrained."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.cli import main
from autoseg.errors import UsageError
from autoseg.networks.registry import build_network
from autoseg.networks.swin_unetr import LEVEL_WIDTHS, feature_size_of
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans
from autoseg.pretraining.inpainting import MaskedInpainting, MaskedReconstructionLoss, random_cube_mask
from autoseg.pretraining.run import PretrainingOptions, pretrain, pretraining_output
from autoseg.pretraining.swin_ssl import (TASK, RotationContrastiveInpainting, RotationContrastiveInpaintingLoss,
                                          SelfSupervisedOutputs, attach_heads, rotate, rotation_axes)
from autoseg.training.loop import TrainingLoop
from autoseg.training.schedule import PolySchedule
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


@pytest.mark.parametrize("amp, cpu_bf16, expected", [(True, True, torch.bfloat16), (False, True, torch.float32),
                                                     (True, False, torch.float32)])
def test_pretraining_computes_under_autocast_and_fp32_opts_out(planned, tmp_path, amp, cpu_bf16, expected):
    """Plans size a batch for a mixed-precision step, and pre-training ran float32 on every device. On a GPU
    it now takes training's autocast; the CPU, float32 by default, shows the path with --cpu-bf16."""
    roots, name, _ = planned
    roots = Roots(roots.raw, roots.preprocessed, tmp_path / "res")
    seen = []

    class RecordOutputDtype:  # from the second iteration on, the network's output dtype
        def on_iteration_end(self, loop, iteration, loss, seconds):
            if iteration == 0:
                loop.network.register_forward_hook(lambda module, args, output: seen.append(output.dtype))

    options = PretrainingOptions(epochs=1, iters_per_epoch=3, seed=0, progress=False, amp=amp, cpu_bf16=cpu_bf16,
                                 device="cpu")
    pretrain(roots, name, "3d_fullres", "unet", options, callbacks=[RecordOutputDtype()])
    assert seen and set(seen) == {expected}


# --- Swin UNETR's three tasks: --task inpainting+rotation+contrastive ---------------------------------------------

def test_rotation_turns_the_yx_plane_by_the_label_and_back():
    plane = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # Counter-clockwise quarter turns of [[1, 2], [3, 4]] (y down, x right), written out by hand.
    by_hand = {0: [[1, 2], [3, 4]], 1: [[2, 4], [1, 3]], 2: [[4, 3], [2, 1]], 3: [[3, 1], [4, 2]]}
    volume = torch.stack([plane, 10 * plane, 100 * plane])[None, None]  # (1, 1, z=3, y=2, x=2): z must stay
    assert rotation_axes([3, 2, 2]) == (3, 4) and rotation_axes([64, 32, 32]) == (3, 4)
    batch = volume.repeat(4, 1, 1, 1, 1)
    turned = rotate(batch, torch.arange(4), (3, 4))
    for k, expected in by_hand.items():
        expected = torch.tensor(expected, dtype=torch.float32)
        assert torch.equal(turned[k, 0], torch.stack([expected, 10 * expected, 100 * expected])), k
    assert torch.equal(rotate(turned, (4 - torch.arange(4)) % 4, (3, 4)), batch)  # the inverse turn restores it
    assert rotation_axes([64, 64]) == (2, 3)  # 2D: the image plane
    assert rotation_axes([32, 64, 32]) == (2, 4)  # no square y-x: the last pair of equal axes
    with pytest.raises(UsageError, match="none"):
        rotation_axes([64, 32, 96])


class _StubSwin(nn.Module):
    """Stands in for SwinUNETR: a ``swinViT`` whose last output is the input, a perfect reconstruction."""

    def __init__(self):
        super().__init__()
        self.swinViT = nn.Identity()
        self.swinViT.forward = lambda x: [x]
        attach_heads(self, 1)

    def forward(self, x):
        self.seen = x
        self.swinViT(x)
        return x


def test_the_views_are_the_patches_turned_by_their_labels_and_the_loss_turns_the_target_alike():
    torch.manual_seed(0)
    image = torch.randn(3, 1, 2, 4, 4)
    network = _StubSwin()
    outputs = RotationContrastiveInpainting(network, (3, 4), ratio=0.0)(image)
    labels = outputs.quarter_turns
    assert labels.shape == (6,) and outputs.rotation_logits.shape == (6, 4) and outputs.embeddings.shape == (6, 512)
    for i in range(6):  # view i and view 3 + i come from patch i
        assert torch.equal(network.seen[i], torch.rot90(image[i % 3], int(labels[i]), (2, 3))), i
    loss = RotationContrastiveInpaintingLoss((3, 4))
    outputs.mask = torch.ones_like(outputs.mask)  # every voxel counts: the unrotated target would not match
    assert float(loss.parts(outputs, image)["inpainting"]) == 0.0
    drawn = {int(turns) for _ in range(10)
             for turns in RotationContrastiveInpainting(network, (3, 4), ratio=0.0)(image).quarter_turns}
    assert drawn == {0, 1, 2, 3}  # all four turns are drawn (60 draws; each misses with odds (3/4)^60)


def _nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.5) -> float:
    """SimCLR's loss written out: each view's positive is its partner, negatives all other views but itself."""
    views = torch.nn.functional.normalize(torch.cat([first, second]), dim=1)
    count = first.shape[0]
    total = 0.0
    for i in range(2 * count):
        partner = (i + count) % (2 * count)
        similarities = [float(views[i] @ views[j]) / temperature for j in range(2 * count) if j != i]
        positive = float(views[i] @ views[partner]) / temperature
        total += -positive + float(torch.logsumexp(torch.tensor(similarities), 0))
    return total / (2 * count)


def test_the_contrastive_loss_is_nt_xent_and_lower_for_matching_pairs():
    torch.manual_seed(1)
    first = torch.randn(4, 8)
    second = first + 0.1 * torch.randn(4, 8)  # each patch's second view: close to its first
    shuffled = second[[1, 2, 3, 0]]  # no patch meets its own partner
    loss = RotationContrastiveInpaintingLoss((2, 3))  # 2D views of 2x2

    def contrastive(a, b):
        outputs = SelfSupervisedOutputs(torch.zeros(8, 1, 2, 2), torch.zeros(8, 1, 2, 2),
                                        torch.zeros(8, dtype=torch.long), torch.zeros(8, 4), torch.cat([a, b]))
        return float(loss.parts(outputs, torch.zeros(4, 1, 2, 2))["contrastive"])

    matching, mismatched = contrastive(first, second), contrastive(first, shuffled)
    assert matching == pytest.approx(_nt_xent(first, second), abs=1e-5)
    assert mismatched == pytest.approx(_nt_xent(first, shuffled), abs=1e-5)
    assert matching < 1.0 < np.log(7) < mismatched  # log(2B - 1): what uniform similarities would give


def test_the_swin_task_is_refused_for_other_architectures(planned, capfd):
    roots, name, flags = planned
    with pytest.raises(UsageError, match=r"needs -a swin_unetr .* unet pre-trains with --task inpainting"):
        pretrain(roots, name, "3d_fullres", "unet", PretrainingOptions(task=TASK, progress=False))
    assert main(["pretrain", "-d", "999", "-c", "3d_fullres", "-a", "unet", "--task", TASK, *flags]) == 2
    assert "needs -a swin_unetr" in capfd.readouterr().err


def _plan_tiny_swin(plans_file) -> None:
    """A 2D Swin UNETR of feature size 12 on a 64x64 patch beside the tiny U-Net (3D costs ten times more)."""
    from autoseg.networks.registry import ARCHITECTURES
    from autoseg.planning.plans import ArchitecturePlan, load_plans, save_plans

    plans = load_plans(plans_file)
    spec = ARCHITECTURES["swin_unetr"]
    topology = spec.topology([64, 64], [1.0, 1.0], 12)
    plans.configurations["2d"].architectures["swin_unetr"] = ArchitecturePlan(
        "swin_unetr", topology.patch_size, 2, topology.kernel_sizes, topology.strides, topology.features,
        {**spec.default_options, "feature_size": 12})
    save_plans(plans, plans_file)


@pytest.mark.slow
def test_swin_pretraining_with_three_tasks_lowers_its_loss_and_feeds_pretrained(planned, capfd):
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.transfer import transfer_weights

    roots, name, flags = planned
    _plan_tiny_swin(roots.plans_file(name))
    # 12 short epochs: the three losses of a batch of two swing by ±0.4 from one epoch to the next (masks, angles and
    # pairs are drawn anew), so 5 epochs' first-against-last-two compare failed on an AVX2 CPU (fp32) by 0.01.
    options = PretrainingOptions(epochs=12, iters_per_epoch=10, task=TASK, seed=0, progress=False)
    output = pretrain(roots, name, "2d", "swin_unetr", options)
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    for entry in log:  # the total is the three parts, weight 1 each
        parts = entry["pretrain_losses"]
        assert set(parts) == {"inpainting", "rotation", "contrastive"}
        assert entry["train_loss"] == pytest.approx(sum(parts.values()), rel=1e-5)
    losses = [e["train_loss"] for e in log]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert "rotation" in capfd.readouterr().out  # the epoch line shows the parts
    final = torch.load(output / "checkpoint_final.pt", weights_only=True)
    heads = set(final["pretrain_head_names"])
    ssl = {h for h in heads if h.startswith("ssl_heads.")}
    assert ssl == {f"ssl_heads.{m}.{p}" for m in ("rotation", "contrastive") for p in ("weight", "bias")}
    assert heads - ssl and all(h.startswith("out.") for h in heads - ssl)  # the reconstruction head
    assert final["model"]["ssl_heads.contrastive.weight"].shape == (512, 16 * 12)
    # What train --pretrained does with it: a segmentation Swin UNETR (3 classes) takes the encoder whole.
    plan = load_plans(roots.plans_file(name)).architecture("2d", "swin_unetr")
    report = transfer_weights(build_network(plan, 1, 3, 2, False), output / "checkpoint_final.pt", "swin_unetr",
                              print_table=False)
    assert {k for k, why in report.unused.items() if why == "pre-training head"} == heads
    assert report.encoder_tensors_loaded == report.encoder_tensors_total > 0
    assert not any(k.startswith("ssl_heads.") for k in report.loaded)


def test_inpainting_split_into_cpu_calls_gives_the_whole_batch_step():
    # autoseg pretrain splits the batch into network calls on the CPU (networks/call_size.py).
    # With the same random draws (the masks are drawn call by call from one stream) the split
    # step must equal the whole-batch one in float64: same masks, loss and updated weights.
    arch = load_plans(Path(__file__).resolve().parents[1] / "plans" / "Dataset999_Synthetic.json").architecture("2d")
    image = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for images_per_call in (None, 1):
        torch.manual_seed(0)
        network = build_network(arch, 1, 1, 2, False).double()
        loop = TrainingLoop(network=network, model=MaskedInpainting(network), loss=MaskedReconstructionLoss(),
                            train_batches=iter(()), val_batches=iter(()),
                            optimizer=torch.optim.SGD(network.parameters(), lr=0.1), schedule=PolySchedule(0.1, 0.9, 1, 1),
                            num_classes=1, val_iters=0, progress=False, images_per_call=images_per_call)
        calls = []
        network.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
        torch.manual_seed(5)
        reconstruction, mask = loop.forward(image)
        torch.manual_seed(5)
        loss = loop.train_step(image, image)
        results.append((mask, loss, torch.cat([p.detach().flatten() for p in network.parameters()])))
        assert calls == ([3, 3] if images_per_call is None else [1] * 6)
    (whole_mask, whole_loss, whole_weights), (split_mask, split_loss, split_weights) = results
    assert whole_mask.shape == split_mask.shape == (3, 1, 32, 32)
    assert 0.2 < float(whole_mask.mean()) < 0.9 and torch.equal(whole_mask, split_mask)
    assert split_loss == pytest.approx(whole_loss, rel=1e-12)
    assert torch.allclose(split_weights, whole_weights, rtol=0, atol=1e-12)


def test_swin_views_split_into_cpu_calls_give_the_whole_batch_step():
    # On the CPU the Swin task runs its 2B views a few per call; the contrastive loss pairs views of
    # different calls, so the heads must still see all of them: in float64 the split step has the
    # whole one's loss, each part of it, and updated weights (same random turns and masks).
    arch = load_plans(Path(__file__).resolve().parents[1] / "plans" / "Dataset999_Synthetic.json").architecture(
        "2d", "swin_unetr")
    image = torch.randn(2, 1, *arch.patch_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    axes = rotation_axes(arch.patch_size)
    results = []
    for views_per_call in (None, 1):
        torch.manual_seed(0)
        network = build_network(arch, 1, 1, 2, False)
        attach_heads(network, feature_size_of(arch) * LEVEL_WIDTHS[-1])
        network.double()
        calls = []
        network.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
        model = RotationContrastiveInpainting(network, axes, views_per_call=views_per_call)
        loss = RotationContrastiveInpaintingLoss(axes)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        torch.manual_seed(5)
        parts = loss.parts(model(image), image)
        sum(parts.values()).backward()
        optimizer.step()
        results.append(({k: float(v.detach()) for k, v in parts.items()},
                        torch.cat([p.detach().flatten() for p in network.parameters()])))
        assert calls == ([4] if views_per_call is None else [1, 1, 1, 1])
    (whole_parts, whole_weights), (split_parts, split_weights) = results
    assert whole_parts["contrastive"] > 0.1 and whole_parts["rotation"] > 0.1  # both heads are in the step
    for name, value in whole_parts.items():
        assert split_parts[name] == pytest.approx(value, rel=1e-10), name
    assert torch.allclose(split_weights, whole_weights, rtol=0, atol=1e-10)


def test_the_unlabelled_cache_follows_its_files_and_an_empty_images_ts_is_skipped(planned, tmp_path, capfd):
    from autoseg.pretraining.data import preprocess_unlabelled

    roots, name, _ = planned
    plans = load_plans(roots.plans_file(name))
    tests = sorted((roots.raw / name / "imagesTs").iterdir())
    for folder, source in (("site_a", tests[0]), ("site_b", tests[1])):  # one name, two different scans
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "scan_0000.nii.gz")
    cache = tmp_path / "cache"
    [case_id] = preprocess_unlabelled(plans, "3d_fullres", [tmp_path / "site_a"], cache)
    from_a = np.load(cache / f"{case_id}.npy")
    assert preprocess_unlabelled(plans, "3d_fullres", [tmp_path / "site_b"], cache) == [case_id]
    from_b = np.load(cache / f"{case_id}.npy")
    assert from_a.shape != from_b.shape or not np.array_equal(from_a, from_b), "site_b's scan, not site_a's again"
    written = (cache / f"{case_id}.npy").stat().st_mtime_ns
    preprocess_unlabelled(plans, "3d_fullres", [tmp_path / "site_b"], cache)
    assert (cache / f"{case_id}.npy").stat().st_mtime_ns == written  # the same files: kept

    # A dataset whose imagesTs is empty pre-trains on imagesTr (it stopped with "no image files").
    raw = tmp_path / "raw"
    shutil.copytree(roots.raw / name, raw / name, ignore=shutil.ignore_patterns("imagesTs"))
    (raw / name / "imagesTs").mkdir()
    shutil.copytree(roots.preprocessed / name, tmp_path / "pre" / name,
                    ignore=shutil.ignore_patterns("pretrain_*", "3d_*", "2d_*"))
    own = Roots(raw, tmp_path / "pre", tmp_path / "res")
    pretrain(own, name, "3d_fullres", "unet", PretrainingOptions(epochs=1, iters_per_epoch=1, seed=0, progress=False))
    assert "pretrain: 6 image(s) from 1 folder(s)" in capfd.readouterr().out
