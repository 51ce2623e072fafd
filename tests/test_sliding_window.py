import dataclasses
import itertools

import numpy as np
import pytest
import torch

import autoseg.inference.sliding_window as sliding_window
from autoseg.inference.model import TrainedModel
from autoseg.inference.predictor import PredictionSettings, predict_case
from autoseg.inference.sliding_window import predict_probabilities, window_starts
from autoseg.io.images import read_label
from tests.test_predict import NearestIntensity, plans  # noqa: F401 - a model that predicts by intensity; its plan


@pytest.mark.parametrize("size, patch, step", [(100, 40, 0.5), (41, 40, 0.5), (300, 64, 0.33), (40, 40, 0.5), (7, 9, 1.0),
                                               (6, 1, 0.5), (10, 2, 0.33)])
def test_windows_cover_the_axis_evenly_at_most_a_step_apart(size, patch, step):
    starts = window_starts(size, patch, step)
    assert starts[0] == 0 and starts[-1] == max(size - patch, 0)
    gaps = np.diff(starts)
    assert np.all(gaps <= max(patch * step, 1)) and np.all(gaps > 0)  # at least a voxel apart
    assert gaps.size == 0 or gaps.max() - gaps.min() <= 1  # evenly spread, up to rounding


@pytest.mark.parametrize("size, patch, step, expected", [
    (100, 40, 0.5, [0, 20, 40, 60]),
    # 236 voxels to travel at most 21.12 apart: ceil(236 / 21.12) + 1 = 13 windows, 19.67 apart, rounded
    (300, 64, 0.33, [0, 20, 39, 59, 79, 98, 118, 138, 157, 177, 197, 216, 236]),
    (41, 40, 0.5, [0, 1]), (40, 40, 0.5, [0]), (10, 2, 0.33, [0, 1, 2, 3, 4, 5, 6, 7, 8]),
])
def test_window_starts_are_nnunets(size, patch, step, expected):
    # nnU-Net's compute_steps_for_sliding_window: ceil((size - patch) / (patch * step)) + 1 windows,
    # spread evenly and rounded (worked by hand above). The last case is where autoseg departs on purpose:
    # windows at least a voxel apart (nnU-Net's 14 windows there would visit most voxels twice).
    assert window_starts(size, patch, step) == expected


def test_overlapping_windows_are_blended_by_a_gaussian_of_sigma_an_eighth_of_the_patch():
    # A network whose answer depends on where a voxel sits in its window: class 1's logit rises along x.
    # Windows of 40 at x = 0 and 20 overlap on [20, 40); there each window's answer is weighted by a
    # Gaussian centred on its window (sigma 40 / 8 = 5), written out here from nnU-Net's definition.
    def ramp_network(x):
        position = torch.arange(x.shape[-1], dtype=torch.float32)
        return torch.stack([torch.zeros_like(x[:, 0]), ((position - 20) / 4).expand_as(x[:, 0])], dim=1)

    probabilities = predict_probabilities([ramp_network], torch.zeros(1, 4, 60), [4, 40], mirror=False)

    def weight(j):  # the window's centre is (40 - 1) / 2 (the far tails, floored, are not visited here)
        return np.exp(-((j - 19.5) ** 2) / (2 * 5.0 ** 2))

    def answer(j):
        return 1 / (1 + np.exp(-(j - 20) / 4))

    for x in [5, 22, 25, 30, 37, 45]:
        inside = [x - start for start in (0, 20) if 0 <= x - start < 40]
        expected = sum(weight(j) * answer(j) for j in inside) / sum(weight(j) for j in inside)
        assert float(probabilities[1, 2, x]) == pytest.approx(expected, abs=1e-5), x
    # Unweighted averaging would give about 0.40 at x = 25; the Gaussian trusts the window centred near it.
    assert float(probabilities[1, 2, 25]) > 0.7


def test_a_2d_network_through_a_volume_sees_each_slice_once():
    calls = []

    def network(x):  # (B, 1, Y, X) slices; returns two-class logits and records which slices it saw
        calls.append(x[:, 0, 0, 0].tolist())
        return torch.cat([-x, x], dim=1) * 50.0

    volume = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1, 1).expand(1, 6, 8, 8).contiguous()
    probabilities = predict_probabilities([network], volume - 2.5, [8, 8], mirror=False, images_per_call=1)
    assert sorted(value for call in calls for value in call) == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    assert probabilities.shape == (2, 6, 8, 8)
    assert torch.equal(probabilities.argmax(0)[:, 0, 0], torch.tensor([0, 0, 0, 1, 1, 1]))


def test_an_image_smaller_than_the_patch_is_padded_and_comes_back_whole():
    labels = torch.randint(0, 2, (6, 11, 9))
    one_hot = torch.nn.functional.one_hot(labels, 2).permute(3, 0, 1, 2).float()
    probabilities = predict_probabilities([lambda x: x * 50.0], one_hot, [8, 16, 16], mirror=True)
    assert probabilities.shape == one_hot.shape and torch.allclose(probabilities, one_hot, atol=1e-4)


def test_compact_accumulation_is_float16_and_agrees_with_float32(monkeypatch):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 1))
    image = torch.randn(1, 20, 30, 26)
    exact = predict_probabilities([network], image, [8, 16, 16], mirror=True)
    monkeypatch.setattr(sliding_window, "COMPACT_ABOVE_BYTES", 0)
    compact = predict_probabilities([network], image, [8, 16, 16], mirror=True)
    assert exact.dtype == torch.float32 and compact.dtype == torch.float16
    assert (compact.float() - exact).abs().max() < 2e-3
    assert torch.allclose(compact.float().sum(0), torch.ones(20, 30, 26), atol=3e-3)


def test_running_argmax_equals_the_full_argmax_when_resampling(synthetic_raw, plans):  # noqa: F811
    """A plan at another spacing: probabilities are resampled back class by class either way."""
    config = dataclasses.replace(plans.configuration("3d_fullres"), spacing=[2.2, 0.8, 1.3])
    finer = dataclasses.replace(plans, configurations={"3d_fullres": config})
    label, geometry = read_label(synthetic_raw / "labelsTr" / "synth_001.nii.gz")
    image = label[None].astype(np.float32) * 10.0 + 5.0
    centres = ((np.array([5.0, 15.0, 25.0]) - image.mean()) / image.std()).tolist()
    model = TrainedModel(finer, "3d_fullres", "unet", [NearestIntensity(centres)], ["0"])
    lean = predict_case(model, image, geometry, PredictionSettings(mirror=False), torch.device("cpu"))
    full = predict_case(model, image, geometry, PredictionSettings(mirror=False, save_probabilities=True),
                        torch.device("cpu"))
    assert lean.probabilities is None and full.probabilities.shape == (3, *label.shape)
    assert np.array_equal(lean.labels, full.labels)
    assert np.array_equal(full.labels, np.array([0, 1, 2])[full.probabilities.astype(np.float32).argmax(0)])
    assert (lean.labels == label).mean() > 0.95  # resampled there and back, boundaries move a little


def test_mirror_flips_batched_together_give_what_one_at_a_time_gives():
    torch.manual_seed(1)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 3, (1, 3, 1), padding=(0, 1, 0)))
    image = torch.randn(2, 12, 30, 21)
    one_by_one = predict_probabilities([network, network], image, [8, 16, 16], mirror=True, images_per_call=1)
    together = predict_probabilities([network, network], image, [8, 16, 16], mirror=True, images_per_call=16)
    assert torch.allclose(one_by_one, together, atol=1e-6)
    unmirrored = predict_probabilities([network], image, [8, 16, 16], mirror=False)
    assert (unmirrored - together).abs().max() > 1e-3  # the flips do change something: not a vacuous comparison


class RampNetwork(torch.nn.Module):
    """Logits 2 x input plus, on class 1, a ramp over the window's own coordinates: not invariant to any flip."""

    def __init__(self, slopes):
        super().__init__()
        self.slopes = slopes  # one per spatial axis of the network

    def forward(self, x):
        axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in x.shape[2:]]
        ramp = sum(s * g for s, g in zip(self.slopes, torch.meshgrid(*axes, indexing="ij")))
        logits = 2.0 * x.clone()
        logits[:, 1] += ramp
        return logits


@pytest.mark.parametrize("patch, slopes", [([6, 10, 8], [0.7, -0.4, 0.25]), ([10, 8], [0.5, -0.3])])
@pytest.mark.parametrize("images_per_call", [1, 3, 8])
def test_mirroring_flips_each_axis_in_and_back_out(patch, slopes, images_per_call):
    """One window (the image is one patch), so the result is the mean over flips of the network's softmax.

    Flipping the window along axis a and the output back negates the ramp's term along a,
    so the expected result is the mean over every sign pattern of the ramp terms, computed
    here without flipping anything. A flip along the wrong axis, or a missing flip back,
    leaves a ramp term unnegated and fails."""
    torch.manual_seed(0)
    spatial = [4, *patch] if len(patch) == 2 else patch  # a 2D network predicts a volume slice by slice
    labels = torch.randint(0, 2, spatial)
    one_hot = torch.nn.functional.one_hot(labels, 2).movedim(-1, 0).float()
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in patch]
    grids = torch.meshgrid(*axes, indexing="ij")
    expected = torch.zeros_like(one_hot)
    signs = list(itertools.product([1, -1], repeat=len(patch)))
    for sign in signs:
        logits = 2.0 * one_hot.clone()
        logits[1] += sum(k * s * g for k, s, g in zip(sign, slopes, grids))  # broadcasts over the 2D case's slices
        expected += torch.softmax(logits, 0) / len(signs)
    mirrored = predict_probabilities([RampNetwork(slopes)], one_hot, patch, mirror=True, images_per_call=images_per_call)
    assert torch.allclose(mirrored, expected, atol=1e-5)
    plain = predict_probabilities([RampNetwork(slopes)], one_hot, patch, mirror=False)
    assert (plain - expected).abs().max() > 0.05, "the ramp is large enough for a wrong flip to show"
