"""--pretrained: partial transfer, the encoder threshold, warm-up and frozen encoder, nnU-Net v2 weights."""

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.errors import CheckpointError
from autoseg.networks.registry import build_network
from autoseg.paths import Roots
from autoseg.planning.plans import ArchitecturePlan, load_plans
from autoseg.training import TrainingOptions, train_fold
from autoseg.training.finetune import FineTuningPhases
from autoseg.training.schedule import PolySchedule
from autoseg.training.transfer import encoder_names, transfer_weights
from tests.conftest import peers_python, preprocess_tiny_synthetic

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = peers_python()


@pytest.fixture(scope="module")
def source(synthetic_raw, tmp_path_factory):
    """A tiny unet trained for one short epoch on the synthetic set: (roots, name, its checkpoint_final.pt)."""
    work = tmp_path_factory.mktemp("transfer")
    roots, _, flags = preprocess_tiny_synthetic(synthetic_raw, work)
    options = TrainingOptions(epochs=1, iters_per_epoch=2, val_iters=1, num_workers=0, seed=0, validate_at_end=False,
                              progress=False)
    output = train_fold(roots, synthetic_raw.name, "3d_fullres", 0, options=options)
    return roots, synthetic_raw.name, output / "checkpoint_final.pt", flags


def _tiny_unet_plan(roots, name) -> ArchitecturePlan:
    return load_plans(roots.plans_file(name)).configurations["3d_fullres"].architectures["unet"]


def test_partial_transfer_to_another_label_set_and_channel_count(source):
    roots, name, checkpoint, _ = source
    saved = torch.load(checkpoint, weights_only=True)["model"]
    torch.manual_seed(1)
    target = build_network(_tiny_unet_plan(roots, name), 2, 5, 3, True)  # 2 channels (source: 1), 5 classes (3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, checkpoint, "unet", print_table=False)
    after = target.state_dict()
    stem = "net.input_block.conv1.conv.weight"
    heads = [k for k in after if k.startswith(("net.output_block.", "net.deep_supervision_heads."))]
    assert heads and stem in report.reinitialised and all(h in report.reinitialised for h in heads)
    for key in heads + [stem]:  # other shapes: untouched fresh initialisation
        assert tuple(saved[key].shape) != tuple(after[key].shape) and torch.equal(after[key], before[key])
    encoder = encoder_names(target, "unet") - {stem}
    assert len(encoder) > 10
    for key in encoder:  # every other encoder tensor is exactly the source's
        assert torch.equal(after[key], saved[key]), key
    assert report.encoder_tensors_loaded == report.encoder_tensors_total - 1
    assert 0.9 < report.encoder_fraction < 1.0
    assert set(report.unused) == {k for k in saved if saved[k].shape != after[k].shape}


def test_a_transfer_that_misses_most_of_the_encoder_is_refused_with_the_table(source, tmp_path, capfd):
    roots, name, _, flags = source
    plan = _tiny_unet_plan(roots, name)
    other = ArchitecturePlan("unet", plan.patch_size, 2, plan.kernel_sizes, plan.strides, [8, 16, 32])  # wider
    wrong = tmp_path / "wider.pt"
    torch.save(build_network(other, 1, 3, 3, True).state_dict(), wrong)  # an exported model, bare state dict
    fold = roots.training_output(name, "3d_fullres", "unet", "1")
    code = main(["train", "999", "3d_fullres", "1", "--pretrained", str(wrong), "--epochs", "1", "--num-workers", "0",
                 *flags])
    err = capfd.readouterr().err
    assert code == 2 and "--allow-partial" in err and str(wrong) in err
    assert "re-initialised" in err and "0.0 % of its weights loaded" in err
    assert not fold.exists()  # nothing written
    report = transfer_weights(build_network(plan, 1, 3, 3, True), wrong, "unet", allow_partial=True, print_table=False)
    assert report.encoder_tensors_loaded == 0 and len(report.unused) > 0


def test_fine_tuning_with_a_frozen_encoder_keeps_the_source_encoder(source):
    roots, name, checkpoint, flags = source
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert main(["train", "999", "3d_fullres", "2", "--pretrained", str(checkpoint), "--freeze-encoder-epochs", "1",
                 "--warmup-epochs", "1", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                 "--num-workers", "0", "--seed", "0", "--no-validation", *flags]) == 0
    fold = roots.training_output(name, "3d_fullres", "unet", "2")
    table = json.loads((fold / "transfer.json").read_text())
    assert len(table["loaded"]) > 20 and not table["reinitialised"] and (fold / "transfer.txt").is_file()
    tuned = torch.load(fold / "checkpoint_final.pt", weights_only=True)
    encoder = [k for k in saved if k.startswith(("net.input_block.", "net.downsamples.", "net.bottleneck."))]
    decoder = [k for k in saved if k.startswith("net.upsamples.") and k.endswith("weight")]
    assert all(torch.equal(tuned["model"][k], saved[k]) for k in encoder)
    assert any(not torch.equal(tuned["model"][k], saved[k]) for k in decoder)
    assert tuned["history"][0]["encoder_frozen"] is True


def test_a_frozen_encoders_gradients_do_not_shrink_the_decoders_clipped_step():
    # The clip (norm 12) took every gradient's norm; with the encoder frozen its (dropped) gradients still
    # shrank the decoder's step: here encoder gradients of norm 200 scaled the decoder's by 0.06.
    from autoseg.training.loop import TrainingLoop

    network = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        network[0].weight.fill_(0.01)
        network[1].weight.fill_(1.0)
    image = torch.full((1, 4), 1000.0)  # hidden units 40 each
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    schedule = PolySchedule(0.1, 0.9, total_epochs=10, iters_per_epoch=3)
    phases = FineTuningPhases(optimizer, schedule, list(network[0].parameters()), freeze_encoder_epochs=1)
    loss = lambda output, target: 0.05 * output.sum()  # noqa: E731
    loop = TrainingLoop(network=network, model=network, loss=loss, train_batches=iter([]), val_batches=iter([]),
                        optimizer=optimizer, schedule=schedule, num_classes=2, callbacks=[phases], progress=False)
    loop.train_step(image, torch.zeros(1))
    assert torch.equal(network[0].weight, torch.full((4, 4), 0.01))  # frozen
    # the decoder's gradient: 0.05 x 40 = 2 per weight, norm 4 < 12, so the step is the full 0.1 x 2
    torch.testing.assert_close(network[1].weight, torch.full((1, 4), 0.8))


def test_warmup_ramps_the_steps_linearly_then_follows_the_schedule():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)  # no momentum: each step moves by lr * grad exactly
    schedule = PolySchedule(0.1, 0.9, total_epochs=10, iters_per_epoch=3)
    phases = FineTuningPhases(optimizer, schedule, [], warmup_epochs=2)

    class Loop:  # the two attributes the callback reads
        class state:
            epoch = 0

    steps = []
    for epoch in range(3):
        for iteration in range(3):
            weight.grad = torch.ones(1)
            start = float(weight.detach())
            optimizer.step()
            steps.append(round(start - float(weight.detach()), 6))
            phases.on_iteration_end(Loop, iteration, 0.0, 0.0)
        Loop.state.epoch = epoch + 1
        phases.on_epoch_end(Loop, {})
    assert steps == [round(0.1 * k / 6, 6) for k in range(1, 7)] + [0.1] * 3
    assert optimizer.param_groups[0]["lr"] == 0.1  # the schedule's rate is left alone


def _run_warmup(scaled_by, steps: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Nesterov SGD (momentum 0.99) on a fixed gradient field for ``steps`` steps, the warm-up of
    2 epochs of 3 iterations done by ``scaled_by``: "phases" (FineTuningPhases), or by hand: "gradient"
    (each gradient scaled k/6 before torch's step) or "lr" (the learning rate scaled k/6 instead)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5))
    gradients = [1 + 0.3 * torch.randn(5) for _ in range(steps)]  # one direction, as early in training
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.99, nesterov=True)
    schedule = PolySchedule(0.1, 0.9, total_epochs=10, iters_per_epoch=3)
    phases = FineTuningPhases(optimizer, schedule, [], warmup_epochs=2) if scaled_by == "phases" else None

    class Loop:
        class state:
            epoch = 0

    for step, gradient in enumerate(gradients):
        factor = min(1.0, (step + 1) / 6)
        weight.grad = gradient * factor if scaled_by == "gradient" else gradient.clone()
        optimizer.param_groups[0]["lr"] = 0.1 * factor if scaled_by == "lr" else 0.1
        optimizer.step()
        if phases:
            phases.on_iteration_end(Loop, step % 3, 0.0, 0.0)
            if step % 3 == 2:
                Loop.state.epoch += 1
                phases.on_epoch_end(Loop, {})
    return weight.detach().clone(), optimizer.state[weight]["momentum_buffer"].clone()


def test_warmup_scales_what_enters_the_momentum_buffer_not_the_step():
    """With momentum 0.99 a learning-rate ramp keeps the warm-up's full-size gradients in the buffer and
    applies them at the full rate when the ramp ends (on Hippocampus 2d that run predicted background for 9
    epochs: finetune.py); the warm-up is torch's own SGD fed gradients scaled by the ramp."""
    weight, buffer = _run_warmup("phases")
    by_gradient, gradient_buffer = _run_warmup("gradient")
    by_lr, lr_buffer = _run_warmup("lr")
    torch.testing.assert_close(weight, by_gradient, rtol=0, atol=1e-6)
    torch.testing.assert_close(buffer, gradient_buffer, rtol=0, atol=1e-6)
    assert (weight - by_lr).abs().max() > 1e-2  # the two warm-ups really differ here
    assert lr_buffer.norm() > 1.25 * buffer.norm()  # 9 full gradients against 6.5 (ramp 1/6..1, then 1)


class _Custom:  # a pickled object of a class: what weights_only refuses to build
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_a_checkpoint_that_is_not_plain_tensors_is_refused_without_running(tmp_path, monkeypatch, source):
    roots, name, _, _ = source
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model": _Custom()}))
    network = build_network(_tiny_unet_plan(roots, name), 1, 3, 3, True)
    with pytest.raises(CheckpointError, match="not a checkpoint of plain tensors"):
        transfer_weights(network, bad, "unet")
    assert not (tmp_path / "pwned_by_checkpoint").exists()
    torch.save({"model": {"a": [1, 2]}}, tmp_path / "lists.pt")
    with pytest.raises(CheckpointError, match="no state dict of network weights"):
        transfer_weights(network, tmp_path / "lists.pt", "unet")


@pytest.fixture(scope="module")
def nnunet_checkpoints(tmp_path_factory):
    """Real nnU-Net v2 checkpoints and logits, written by nnU-Net's own trainer in the peers venv."""
    if not PEERS_PYTHON.is_file():
        pytest.skip(f"{PEERS_PYTHON} is missing (nnU-Net v2 runs from the peers venv: /work/shared/peers/setup.sh)")
    folder = tmp_path_factory.mktemp("nnunet")
    for kind, kernels in [("PlainConvUNet", "isotropic"), ("ResidualEncoderUNet", "isotropic"),
                          ("PlainConvUNet", "anisotropic"), ("ResidualEncoderUNet", "anisotropic")]:
        done = subprocess.run([str(PEERS_PYTHON), str(REPO / "tests" / "peers" / "nnunet_checkpoint.py"),
                               str(folder / f"{kind}_{kernels}"), kind, kernels], capture_output=True, text=True, env={
                                   k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)})
        if done.returncode and "No module named" in done.stderr:
            pytest.skip(f"nnU-Net is not installed in {PEERS_PYTHON}: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["isotropic", "anisotropic"])
@pytest.mark.parametrize("kind,architecture", [("PlainConvUNet", "unet"), ("ResidualEncoderUNet", "resenc_unet")])
def test_nnunet_weights_give_nnunets_logits(nnunet_checkpoints, kind, architecture, kernels):
    """Anisotropic: stages 1x3x3, 1x3x3, 3x3x3, 3x1x1, where each decoder level must take its own stage's kernel."""
    folder = nnunet_checkpoints / f"{kind}_{kernels}"
    arch = json.loads((folder / "arch.json").read_text())
    options = ({"transposed_conv_bias": True} if architecture == "unet"
               else {"blocks_per_stage": arch["n_blocks_per_stage"]})
    plan = ArchitecturePlan(architecture, arch["patch"], 2, arch["kernel_sizes"], arch["strides"],
                            arch["features_per_stage"], options)
    network = build_network(plan, 2, 3, 3, True)
    report = transfer_weights(network, folder / "checkpoint_final.pth", architecture, print_table=False)
    assert not report.reinitialised
    # Only the conv biases InstanceNorm cancels are left out (DynUNet has none there).
    assert all("InstanceNorm" in why for why in report.unused.values())
    network.eval()
    with torch.no_grad():
        logits = network(torch.from_numpy(np.load(folder / "input.npy"))).numpy()
    expected = np.load(folder / "logits.npy")
    assert np.abs(expected).max() > 0.05  # random weights, biases included: a real comparison
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    if architecture == "unet":  # the default unet plan has no transposed-conv bias: listed, not silently lost
        plain = ArchitecturePlan("unet", plan.patch_size, 2, plan.kernel_sizes, plan.strides, plan.features)
        report = transfer_weights(build_network(plain, 2, 3, 3, True), folder / "checkpoint_final.pth", "unet",
                                  print_table=False)
        assert sorted(report.unused)[-3:] == [f"net.upsamples.{i}.transp_conv.conv.bias" for i in range(3)]
        with pytest.raises(CheckpointError, match="maps onto autoseg's unet"):
            transfer_weights(build_network(plain, 2, 3, 3, True), folder / "checkpoint_final.pth", "resenc_unet")


def _binary_copy(raw_dataset: Path, target_root: Path) -> Path:
    """The synthetic dataset as Dataset998_Binary: one foreground label (the source has two), same images."""
    import shutil

    import SimpleITK as sitk

    target = target_root / "Dataset998_Binary"
    shutil.copytree(raw_dataset, target)
    for folder in ("labelsTr", "labelsTs"):
        for path in (target / folder).glob("*.nii.gz"):
            label = sitk.ReadImage(str(path))
            binary = sitk.Cast(label > 0, label.GetPixelID())
            binary.CopyInformation(label)
            sitk.WriteImage(binary, str(path))
    spec = json.loads((target / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "foreground": 1}
    (target / "dataset.json").write_text(json.dumps(spec))
    return target


def test_plans_from_another_dataset_take_its_networks_and_keep_own_labels_and_normalisation(source, tmp_path):
    roots, name, checkpoint, _ = source
    raw = tmp_path / "raw"
    _binary_copy(roots.raw / name, raw)
    target_roots = Roots(raw, tmp_path / "pre", roots.results)
    flags = [f"--raw={raw}", f"--preprocessed={target_roots.preprocessed}", f"--results={roots.results}"]
    # The source's plans.json given as a file (its tiny unet differs from anything the planner would choose).
    assert main(["plan-and-preprocess", "-d", "998", "-c", "3d_fullres", "-np", "1", "-a", "unet",
                 "--plans-from", str(roots.plans_file(name)), *flags]) == 0
    source_plans, plans = load_plans(roots.plans_file(name)), load_plans(target_roots.plans_file("Dataset998_Binary"))
    mine, theirs = plans.configurations["3d_fullres"], source_plans.configurations["3d_fullres"]
    assert mine.spacing == theirs.spacing
    for field in ("patch_size", "batch_size", "kernel_sizes", "strides", "features"):
        assert getattr(mine.architectures["unet"], field) == getattr(theirs.architectures["unet"], field)
    assert plans.labels == {"background": 0, "foreground": 1} and plans.num_segmentation_heads == 2
    assert mine.data_identifier != theirs.data_identifier  # other labels: other preprocessed data
    # Fine-tuning the source's network here: all but the output heads (3 classes there, 2 here) load.
    assert main(["train", "998", "3d_fullres", "0", "--pretrained", str(checkpoint), "--epochs", "1",
                 "--iters-per-epoch", "1", "--val-iters", "1", "--num-workers", "0", "--no-validation", *flags]) == 0
    table = json.loads((target_roots.training_output("Dataset998_Binary", "3d_fullres", "unet", "0")
                        / "transfer.json").read_text())
    assert table["reinitialised"] and all(k.startswith(("net.output_block.", "net.deep_supervision_heads."))
                                          for k in table["reinitialised"])
    assert table["encoder_tensors_loaded"] == table["encoder_tensors_total"]
