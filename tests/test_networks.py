"""Every registered architecture against the network contract of ``autoseg.networks.registry``.

Sizes are tiny on purpose (features 8..64, patches of a few thousand voxels) so the whole
file runs on two CPU cores in about a minute; the numbers checked are real all the same.
"""

from __future__ import annotations

import pytest
import torch

from autoseg.networks import selective_scan as scan_module
from autoseg.networks.mlstm import mlstm_chunkwise, mlstm_recurrent
from autoseg.networks.registry import ARCHITECTURES, build_network
from autoseg.planning.plans import ArchitecturePlan

# Tiny convolutions gain nothing from a second thread, and on a loaded 2-core machine OpenMP
# spin-waiting made a 30 ms training step take over 2 s.
torch.set_num_threads(1)

IN_CHANNELS, NUM_CLASSES, BATCH = 2, 3, 2
# Per architecture, options that keep CPU tests small (the planner would set these for real data).
SMALL_OPTIONS = {
    "swin_unetr": {"feature_size": 12},
    "resenc_unet": {"blocks_per_stage": [1, 2, 2, 2]},
    "umamba_bot": {"blocks_per_stage": [1], "d_state": 8},
    "umamba_enc": {"blocks_per_stage": [1], "d_state": 8},
    "xlstm_unet": {"blocks_per_stage": [1], "heads": 2},
}


def small_plan(name: str, dims: int) -> ArchitecturePlan:
    spec = ARCHITECTURES[name]
    if dims == 2:
        patch = [64, 64]
    else:
        patch = [32, 32, 64] if name == "swin_unetr" else [16, 32, 32]
    topo = spec.topology(patch, [1.0] * dims)
    assert topo.patch_size == patch, "test patches are chosen to need no rounding"
    features = [min(8 * 2 ** i, 64) for i in range(topo.num_stages)]
    options = {**spec.default_options, **SMALL_OPTIONS.get(name, {})}
    plan = ArchitecturePlan(name, topo.patch_size, BATCH, topo.kernel_sizes, topo.strides, features, options)
    assert spec.check_plan(plan, dims) is None
    return plan


def fixed_batch(plan: ArchitecturePlan) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, IN_CHANNELS, *plan.patch_size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH, *plan.patch_size), generator=gen)
    return x, y


CASES = [(name, dims) for name in sorted(ARCHITECTURES) for dims in (2, 3)]


@pytest.mark.parametrize("name,dims", CASES)
def test_forward_contract(name: str, dims: int) -> None:
    torch.manual_seed(0)
    plan = small_plan(name, dims)
    model = build_network(plan, IN_CHANNELS, NUM_CLASSES, dims, deep_supervision=True)
    x, _ = fixed_batch(plan)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (BATCH, NUM_CLASSES, *plan.patch_size)
    assert torch.isfinite(out).all()

    model.train()
    out = model(x)
    if name == "swin_unetr":
        assert isinstance(out, torch.Tensor) and out.shape == (BATCH, NUM_CLASSES, *plan.patch_size)
        return
    assert isinstance(out, list) and len(out) == len(plan.strides) - 1
    assert out[0].shape == (BATCH, NUM_CLASSES, *plan.patch_size)
    previous = plan.patch_size
    for level in out[1:]:
        shape = list(level.shape[2:])
        assert level.shape[:2] == (BATCH, NUM_CLASSES)
        assert all(p % s == 0 and p >= s for p, s in zip(previous, shape)), (previous, shape)
        assert shape != previous
        previous = shape


@pytest.mark.parametrize("name,dims", CASES)
def test_deep_supervision_heads_run_in_training_only(name: str, dims: int) -> None:
    # Prediction builds networks with their heads (so the weights fit) and runs them in eval mode: a head run
    # there is work for nothing, and its kept output memory held per fold of an ensemble (MONAI's DynUNet ran them).
    plan = small_plan(name, dims)
    model = build_network(plan, IN_CHANNELS, NUM_CLASSES, dims, deep_supervision=True)
    x, _ = fixed_batch(plan)
    low_resolution_logits = []

    def record(module, args, output):  # a convolution giving class logits below full resolution: a head
        if output.shape[1] == NUM_CLASSES and list(output.shape[2:]) != plan.patch_size:
            low_resolution_logits.append(type(module).__name__)

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            module.register_forward_hook(record)
    with torch.no_grad():
        model.eval()(x)
        assert low_resolution_logits == []
        model.train()(x)
    assert bool(low_resolution_logits) == (name != "swin_unetr")  # swin_unetr has no deep supervision


@pytest.mark.parametrize("name,dims", CASES)
def test_loss_decreases_and_checkpoint_roundtrips(name: str, dims: int, tmp_path) -> None:
    torch.manual_seed(0)
    plan = small_plan(name, dims)
    model = build_network(plan, IN_CHANNELS, NUM_CLASSES, dims, deep_supervision=True)
    x, y = fixed_batch(plan)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(5):
        out = model(x)
        logits = out[0] if isinstance(out, list) else out
        loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1e-3, losses

    path = tmp_path / "checkpoint.pt"
    torch.save(model.state_dict(), path)
    fresh = build_network(plan, IN_CHANNELS, NUM_CLASSES, dims, deep_supervision=True)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("patch", [[37, 51, 29], [113, 97], [5, 160, 160]])
def test_topology_rule_gives_accepted_plan(name: str, patch: list[int]) -> None:
    spec = ARCHITECTURES[name]
    dims = len(patch)
    spacing = [3.0, 0.8, 0.8] if patch[0] == 5 else [1.0] * dims
    topo = spec.topology(patch, spacing)
    assert all(got >= want for got, want in zip(topo.patch_size, patch))
    plan = ArchitecturePlan(name, topo.patch_size, 2, topo.kernel_sizes, topo.strides, topo.features,
                            dict(spec.default_options))
    assert spec.check_plan(plan, dims) is None


def test_swin_check_refuses_patch_not_divisible_by_32() -> None:
    spec = ARCHITECTURES["swin_unetr"]
    topo = spec.topology([64, 64, 64], [1.0] * 3)
    plan = ArchitecturePlan("swin_unetr", [48, 64, 64], 2, topo.kernel_sizes, topo.strides, topo.features,
                            {"feature_size": 12})
    problem = spec.check_plan(plan, 3)
    assert problem is not None and "32" in problem
    assert spec.topology([37, 51, 29], [1.0] * 3).patch_size == [64, 64, 32]
    assert spec.topology([20, 30, 25], [1.0] * 3).patch_size == [32, 64, 32]
    plan.patch_size = [32, 32, 32]
    assert "bottleneck" in spec.check_plan(plan, 3)


@pytest.mark.parametrize("length,chunk", [(100, 8), (37, 16), (64, 32)])
def test_chunked_selective_scan_matches_sequential(length: int, chunk: int, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(length)
    batch, d_inner, d_state = 2, 6, 4
    u = torch.randn(batch, length, d_inner, generator=gen, requires_grad=True)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, d_inner, generator=gen)).requires_grad_()
    A = -torch.rand(d_inner, d_state, generator=gen) * 4
    B, C = torch.randn(2, batch, length, d_state, generator=gen)
    D = torch.randn(d_inner, generator=gen)
    # Blocks of 24 tokens: exercises padding, several chunks, several checkpointed blocks.
    monkeypatch.setattr(scan_module, "BLOCK_ELEMENTS", 24 * batch * d_inner * d_state)
    fast = scan_module.selective_scan(u, delta, A, B, C, D, chunk_size=chunk)
    reference = scan_module.selective_scan_reference(u, delta, A, B, C, D)
    assert fast.shape == reference.shape == (batch, length, d_inner)
    assert (fast - reference).abs().max().item() < 1e-4
    grads_fast = torch.autograd.grad(fast.square().sum(), [u, delta])
    grads_ref = torch.autograd.grad(reference.square().sum(), [u, delta])
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        assert torch.allclose(g_fast, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,chunk", [(100, 16), (37, 64), (64, 8)])
def test_chunkwise_mlstm_matches_recurrent(length: int, chunk: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(length)
    batch, heads, d = 2, 3, 5
    q, k, v = (torch.randn(batch, heads, length, d, generator=gen, dtype=dtype, requires_grad=True)
               for _ in range(3))
    # Strong, varied gates: input pre-activations up to ~+-9 exercise the max-stabiliser.
    i_pre = torch.randn(batch, heads, length, generator=gen, dtype=dtype) * 3
    f_pre = torch.randn(batch, heads, length, generator=gen, dtype=dtype) * 3 + 2
    fast = mlstm_chunkwise(q, k, v, i_pre, f_pre, chunk_size=chunk)
    reference = mlstm_recurrent(q, k, v, i_pre, f_pre)
    assert fast.shape == reference.shape == (batch, heads, length, d)
    if dtype == torch.float64:  # the two forms are the same function: equal to rounding
        assert (fast - reference).abs().max().item() < 1e-4
    # A near-zero normaliser makes some outputs ~100 here, so float32 is compared relatively
    # (both float32 forms are ~1e-5 relative from the float64 result).
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4)
    grads_fast = torch.autograd.grad(fast.square().sum(), [q, k, v])
    grads_ref = torch.autograd.grad(reference.square().sum(), [q, k, v])
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        scale = g_ref.abs().max().item()
        assert (g_fast - g_ref).abs().max().item() < 1e-4 * max(1.0, scale)


def test_flop_counter_counts_a_convolution_as_two_operations_per_multiply_add() -> None:
    from autoseg.networks.flops import forward_flops

    conv = torch.nn.Conv3d(4, 8, kernel_size=3, padding=1, bias=False)
    # 8 outputs per voxel, each 4*27 multiply-adds, on 6*7*5 voxels
    assert forward_flops(conv, (1, 4, 6, 7, 5)) == 2 * 8 * 4 * 27 * 6 * 7 * 5


def test_unet_decoder_levels_take_their_own_stage_kernel_and_older_weights_are_refused_by_name(tmp_path):
    """nnU-Net's decoder convolves each level with its encoder stage's kernel; MONAI DynUNet (which
    autoseg used before 2026-12-05) with the stage below's. Weights saved from that network must be
    refused with the file named and the reason, not loaded or failing with a bare RuntimeError."""
    from monai.networks.nets import DynUNet

    from autoseg.errors import CheckpointError
    from autoseg.inference.model import load_network_weights

    kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    plan = ArchitecturePlan("unet", [8, 32, 32], 2, kernels, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [4, 8, 16, 32])
    network = build_network(plan, 1, 3, 3, True)
    # upsamples[j] ends at level len - 2 - j: its convolutions have that level's kernel.
    decoder_kernels = [list(block.conv_block.conv1.conv.weight.shape[2:]) for block in network.net.upsamples]
    assert decoder_kernels == [[3, 3, 3], [1, 3, 3], [1, 3, 3]]

    old = DynUNet(3, 1, 3, kernels, plan.strides, plan.strides[1:], filters=plan.features,
                  norm_name=("INSTANCE", {"affine": True}), deep_supervision=True, deep_supr_num=2)
    old_weights = {f"net.{name}": tensor for name, tensor in old.state_dict().items()}  # as PlannedUNet held it
    with pytest.raises(CheckpointError, match="checkpoint_final.pt.*do not fit the planned network.*must be retrained"):
        load_network_weights(network, old_weights, tmp_path / "checkpoint_final.pt")
