import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.errors import CheckpointError
from autoseg.networks.registry import build_network
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans, save_plans
from autoseg.training import loop
from autoseg.training.loop import TrainingOptions, train_fold
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from autoseg.training.splits import make_splits


@pytest.fixture(scope="module")
def tiny(synthetic_raw, tmp_path_factory):
    """The synthetic dataset preprocessed, with the plan shrunk to a network that trains in seconds."""
    work = tmp_path_factory.mktemp("train")
    roots = Roots(synthetic_raw.parent, work / "pre", work / "res")
    flags = [f"--raw={roots.raw}", f"--preprocessed={roots.preprocessed}", f"--results={roots.results}"]
    assert main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1", "-a", "unet"] + flags) == 0
    plans_file = roots.plans_file(synthetic_raw.name)
    plans = load_plans(plans_file)
    unet = plans.configurations["3d_fullres"].architectures["unet"]
    unet.patch_size, unet.batch_size = [8, 32, 32], 2
    unet.kernel_sizes, unet.strides, unet.features = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [4, 8, 16]
    save_plans(plans, plans_file)
    return roots, synthetic_raw.name


def _options(**changes):
    values = dict(epochs=3, iters_per_epoch=3, val_iters=1, num_workers=0, seed=3, validate_at_end=False, progress=False)
    values.update(changes)
    return TrainingOptions(**values)


def test_splits_are_deterministic_cover_every_case_once_and_keep_patients_together():
    cases = [f"patient{p:03d}_frame{f:02d}" for p in range(12) for f in (1, 12)]
    splits = make_splits(cases)
    assert splits == make_splits(list(reversed(cases)))
    validation = [c for s in splits for c in s["val"]]
    assert sorted(validation) == sorted(cases)
    for split in splits:
        assert not set(split["train"]) & set(split["val"])
        patients = {c.split("_")[0] for c in split["val"]}
        assert all(c.split("_")[0] not in patients for c in split["train"])


def test_loss_rewards_the_right_answer_and_ignores_ignored_voxels():
    target = torch.randint(0, 3, (2, 8, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 20
    random = torch.randn(2, 3, 8, 8, 8)
    loss = DiceCELoss()
    assert loss(perfect, target) < 0.01 < loss(random, target)
    ignored = target.clone()
    ignored[:, :2] = -1
    changed = perfect.clone()
    changed[:, :, :2] = torch.randn_like(changed[:, :, :2]) * 50  # garbage where the target is ignored
    assert loss(changed, ignored) == pytest.approx(float(loss(perfect, ignored)), abs=1e-6)
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_a_few_iterations_decrease_the_loss(tiny):
    roots, name = tiny
    plans = load_plans(roots.plans_file(name))
    arch = plans.architecture("3d_fullres")
    torch.manual_seed(0)
    network = build_network(arch, 1, 3, 3, True)
    from autoseg.training.data import PatchSampler

    folder = roots.preprocessed_dataset(name) / plans.configurations["3d_fullres"].data_identifier
    np.random.seed(0)
    image, target = PatchSampler(folder, ["synth_000", "synth_001"], arch.patch_size, 2, augment=False).batch()
    optimizer = torch.optim.Adam(network.parameters(), 1e-2)
    criterion = DeepSupervisionLoss(DiceCELoss())
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = criterion(network(image), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, monkeypatch):
    roots, name = tiny
    straight = Roots(roots.raw, roots.preprocessed, roots.results.parent / "straight")
    out = train_fold(straight, name, "3d_fullres", "0", options=_options())
    reference = torch.load(out / "checkpoint_latest.pt", weights_only=True)

    killed = Roots(roots.raw, roots.preprocessed, roots.results.parent / "killed")
    real_draw = loop.draw_progress

    def die_after_second_epoch(path, history):
        real_draw(path, history)
        if len(history) == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "draw_progress", die_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_fold(killed, name, "3d_fullres", "0", options=_options())
    monkeypatch.setattr(loop, "draw_progress", real_draw)
    out = train_fold(killed, name, "3d_fullres", "0", options=_options(resume=True))
    resumed = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    assert resumed["epoch"] == reference["epoch"] == 3
    for key, value in reference["model"].items():
        assert torch.allclose(resumed["model"][key], value, atol=1e-6), key
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(reference["history"])
    assert (out / "progress.png").stat().st_size > 1000 and len((out / "training_log.jsonl").read_text().splitlines()) == 3


def test_tampered_checkpoint_is_refused_on_continue(tiny, tmp_path):
    roots, name = tiny
    roots = Roots(roots.raw, roots.preprocessed, tmp_path / "res")
    fold = roots.training_output(name, "3d_fullres", "unet", 0)
    fold.mkdir(parents=True)
    torch.save(torch.zeros(3), fold / "checkpoint_latest.pt")
    with pytest.raises(CheckpointError, match="does not hold a training state"):
        train_fold(roots, name, "3d_fullres", "0", options=_options(resume=True))
    (fold / "checkpoint_latest.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="not a valid autoseg checkpoint"):
        train_fold(roots, name, "3d_fullres", "0", options=_options(resume=True))


def test_ddp_with_gloo_on_two_cpu_processes(tiny, tmp_path):
    roots, name = tiny
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
               "-m", "autoseg", "train", name, "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "2",
               "--val-iters", "1", "--num-workers", "0", "--no-validation", "--seed", "1",
               f"--raw={roots.raw}", f"--preprocessed={roots.preprocessed}", f"--results={tmp_path / 'res'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 0: train loss") == 1, "only rank 0 reports"
    fold = tmp_path / "res" / name / "3d_fullres__unet" / "fold_0"
    assert sorted(p.name for p in fold.glob("checkpoint_*.pt")) == ["checkpoint_best.pt", "checkpoint_final.pt",
                                                                    "checkpoint_latest.pt"]
