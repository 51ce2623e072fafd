"""Channels-last prediction on the CPU (autoseg.networks.memory_format) against PyTorch's own
instance norm and the networks in their default layout, in float32 where both must agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoseg.inference.model import load_trained_model
from autoseg.networks.memory_format import ChannelsLast, ChannelsLastInstanceNorm, channels_last_format
from autoseg.networks.registry import ARCHITECTURES, build_network
from autoseg.planning.plans import load_plans
from test_networks import small_plan  # the tiny plans every architecture's contract is tested on

torch.set_num_threads(1)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_equals_torchs_in_value_and_gradients_and_keeps_the_layout(dims):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 5, *([6, 7, 4] if dims == 3 else [9, 11]))
    reference = (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(5, affine=True, eps=1e-5)
    with torch.no_grad():  # weights and biases other than 1 and 0, so a swapped or dropped one would show
        reference.weight.copy_(torch.rand(5, generator=generator) + 0.5)
        reference.bias.copy_(torch.randn(5, generator=generator))
    ours = ChannelsLastInstanceNorm(reference)
    base = torch.randn(shape, generator=generator) * 3 + 2
    upstream = torch.randn(shape, generator=generator)

    expected_input = base.clone().requires_grad_()
    expected = reference(expected_input)
    expected.backward(upstream)
    expected_grads = [expected_input.grad, reference.weight.grad.clone(), reference.bias.grad.clone()]
    reference.weight.grad = reference.bias.grad = None

    layout = channels_last_format(dims)
    x = base.contiguous(memory_format=layout).requires_grad_()
    out = ours(x)
    assert out.is_contiguous(memory_format=layout) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.backward(upstream.contiguous(memory_format=layout))
    for got, want in zip([x.grad, ours.weight.grad, ours.bias.grad], expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # An input in the default layout (a layer that gave the layout up) is normalised the same, into channels-last.
    from_default = ours(base)
    assert from_default.is_contiguous(memory_format=layout)
    torch.testing.assert_close(from_default, expected.detach(), atol=1e-5, rtol=1e-5)


def test_instance_norm_of_a_single_voxel_fails_as_torchs_does():
    norm = ChannelsLastInstanceNorm(nn.InstanceNorm3d(4, affine=True))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        norm(torch.randn(1, 4, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d))


CHANNELS_LAST_CASES = [(name, dims) for name, spec in sorted(ARCHITECTURES.items()) for dims in spec.cpu_channels_last]


@pytest.mark.parametrize("name,dims", CHANNELS_LAST_CASES)
def test_channels_last_network_predicts_what_the_default_layout_does(name, dims):
    torch.manual_seed(0)
    plan = small_plan(name, dims)
    network = build_network(plan, 2, 3, dims, deep_supervision=True)
    for module in network.modules():  # trained-looking norms: not every weight 1 and bias 0
        if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    network.eval()
    names_before = list(network.state_dict())
    x = torch.randn(3, 2, *plan.patch_size)
    with torch.inference_mode():
        expected = network(x)
        wrapped = ChannelsLast(network, dims).eval()
        layouts = []  # per norm call: did it get channels-last memory (the fast path), or fall back?
        norms = [m for m in wrapped.modules() if isinstance(m, ChannelsLastInstanceNorm)]
        for norm in norms:
            norm.register_forward_hook(lambda module, inputs, output: layouts.append(
                inputs[0].is_contiguous(memory_format=channels_last_format(dims))))
        got = wrapped(x)
    assert list(wrapped.network.state_dict()) == names_before  # checkpoints load into either
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)) for m in wrapped.modules())
    assert len(layouts) >= len(norms) > 0 and any(layouts)
    if name == "unet":  # every layer keeps the layout (ResEnc's pooled skips give it up, the next norm restores it)
        assert all(layouts), "a layer before a norm lost the channels-last layout"
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_trained_models_are_channels_last_on_the_cpu_only_where_the_registry_says(tmp_path, monkeypatch):
    """load_trained_model wraps a U-Net for the CPU; an architecture without the flag stays as built."""
    plans_path = Path(__file__).resolve().parents[1] / "plans" / "Dataset004_Hippocampus.json"
    plans = load_plans(plans_path)
    model_dir = tmp_path / "3d_fullres__unet"
    (model_dir / "fold_0").mkdir(parents=True)
    (model_dir / "plans.json").write_text(plans_path.read_text())
    plan = plans.architecture("3d_fullres", "unet")
    network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, 3, True)
    torch.save({"model": network.state_dict()}, model_dir / "fold_0" / "checkpoint_final.pt")
    model = load_trained_model(model_dir, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    assert isinstance(model.networks[0], ChannelsLast)
    x = torch.randn(1, 1, *plan.patch_size)
    with torch.inference_mode():
        torch.testing.assert_close(model.networks[0](x), network.eval()(x), atol=2e-4, rtol=1e-4)

    monkeypatch.setitem(ARCHITECTURES, "unet", dataclasses.replace(ARCHITECTURES["unet"], cpu_channels_last=()))
    assert not isinstance(load_trained_model(model_dir, ["0"], "3d_fullres", "unet",
                                             torch.device("cpu")).networks[0], ChannelsLast)
    assert (model_dir / "plans.json").read_text() == plans_path.read_text()  # untouched


def test_a_channels_last_training_step_updates_the_weights_as_the_default_layout_does():
    """Two SGD steps of training's own loop (deep-supervision Dice+CE, gradient clip, momentum), float32: the
    channels-last network ends where the one in PyTorch's layout with its own instance norm does."""
    from autoseg.training.loop import TrainingLoop
    from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
    from autoseg.training.schedule import PolySchedule

    torch.manual_seed(0)
    plan = small_plan("unet", 3)
    reference = build_network(plan, 2, 3, 3, deep_supervision=True)
    network = build_network(plan, 2, 3, 3, deep_supervision=True)
    network.load_state_dict(reference.state_dict())
    initial = {key: value.clone() for key, value in reference.state_dict().items()}
    wrapped = ChannelsLast(network, 3)  # converts ``network`` in place, as train_fold does
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 2, *plan.patch_size, generator=generator),
                torch.randint(0, 3, (2, *plan.patch_size), generator=generator)) for _ in range(2)]
    ends = []
    for net, model in ((reference, reference), (network, wrapped)):
        loop = TrainingLoop(network=net, model=model, loss=DeepSupervisionLoss(DiceCELoss()),
                            train_batches=iter(()), val_batches=iter(()),
                            optimizer=torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True),
                            schedule=PolySchedule(0.01, 0.9, 1, 2), num_classes=3, progress=False,
                            images_per_call=1)
        losses = [loop.train_step(image, target) for image, target in batches]
        ends.append((losses, net.state_dict()))
    (losses_a, weights_a), (losses_b, weights_b) = ends
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert list(weights_a) == list(weights_b)
    assert sum(not torch.equal(weights_a[key], initial[key]) for key in initial) > len(initial) // 2  # it trained
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(weights_b[key].dim() == 5 and weights_b[key].is_contiguous(memory_format=torch.channels_last_3d)
               and not weights_b[key].is_contiguous() for key in weights_b)
