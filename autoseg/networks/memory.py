"""A measured memory model: the bytes one training step of a network needs.

Instead of a hand-tuned constant per architecture, the planner builds the network and
runs one forward pass on a small input on PyTorch's ``meta`` device (shapes only, no
arithmetic, no memory), recording every tensor autograd saves for the backward pass.
Those saved activations dominate training memory and grow linearly with the number
of voxels, so one measurement per topology scales to any batch and patch of that
topology. Parameters, gradients and optimiser state are added on top, and so is the
transient peak of recomputing a gradient-checkpointed region in the backward pass (the
selective scan's blocks, the mLSTM cell), which the meta pass cannot see because
checkpointing saves nothing: such modules report it for a batch and sequence length
(``recompute_peak()``: a function of batch and sequence length), the meta pass records the length each one sees per
voxel of the probe, and the estimate asks every region for its peak at the real batch and patch
and adds the largest (regions are recomputed one after another). A scan block's peak stops
growing once a block is full; the mLSTM's grows with the sequence.

What is saved is not all a step holds: the backward's gradient buffers coexist with the saved
tensors, and under autocast the fraction of bytes kept in 2 bytes depends on the network (norms and
softmax stay fp32). Both are measured per network by running one forward and backward pass on
fake CPU tensors (``FakeTensorMode``, autocast included, nothing allocated) and recording the peak
of live storage: ``step_over_saved``, the peak over the saved bytes, multiplies them.

The estimate is asked for a device type and a precision: on CUDA the caching allocator's
overhead and the context are added; on the CPU neither (``autoseg.training.memory_guard``
adds glibc's heap, which depends on the allocator settings training chooses), and the step runs
in fp32 unless bf16 autocast is on.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# bf16/fp16 autocast stores most activations in 2 bytes, but normalisation layers, attention's
# softmax and regions that run in fp32 inside autocast keep fp32 ones, so the fraction is measured
# per network (``step_over_saved``: 0.57-0.67 for the U-Net, 0.5-0.62 for the Mambas and xLSTM,
# 0.65 for 2D and 0.91 for 3D Swin UNETR, whose window softmax spans 343 tokens); this one,
# measured on DynUNet, serves where that measurement cannot run.
AMP_ACTIVATION_FACTOR = 0.6
# Autocast casts every weight to 2 bytes once per forward and keeps the copy for backward: in
# bench_arch's CPU steps the bf16 peak's part that does not grow with the batch exceeds fp32's by
# about this (U-Net 2d +11 MB for 1.9 M parameters, ResEnc +26 MB for 8.7 M; ``scripts/bench_arch.py
# --configuration 2d --arch unet resenc_unet --batch 4`` and ``--batch 12``, ``--precision fp32`` and ``bf16``).
AMP_WEIGHT_COPY_BYTES = 2
# The caching allocator's fragmentation and the backward pass's transient buffers.
ALLOCATOR_OVERHEAD = 1.25
# Workspace of the CUDA context and cuDNN, independent of the network.
CONTEXT_BYTES = 0.5 * 2**30
# Largest probe measured by a real CPU pass when the meta device cannot run a network.
CPU_PROBE_MAX_VOXELS = 64**3


@dataclass
class RecomputedRegion:
    """A module whose forward is gradient-checkpointed, as the meta pass met it."""
    peak_bytes: Callable[..., float]  # (batch, sequence length, device_type) -> peak of recomputing it in backward
    tokens_per_voxel: float  # its sequence length per voxel of the patch


@dataclass
class MemoryEstimate:
    activation_bytes_per_voxel: float  # per sample, fp32
    parameter_count: int
    recomputed: list[RecomputedRegion] = field(default_factory=list)
    # autocast -> peak bytes alive over a forward and backward pass over the fp32 saved bytes (autocast's
    # 2-byte copies, the backward's gradient buffers; see ``step_over_saved``), measured when first asked.
    step_over_saved: Callable[[bool], float] = lambda autocast: _unmeasured_step_over_saved(autocast)

    def recompute_bytes(self, batch_size: int, patch_voxels: int, device_type: str = "cuda") -> float:
        """Peak of recomputing the largest checkpointed region during backward (in fp32 under autocast too)."""
        if batch_size < 1:
            return 0.0
        return max((region.peak_bytes(batch_size, max(1, round(region.tokens_per_voxel * patch_voxels)), device_type)
                    for region in self.recomputed), default=0.0)

    def training_bytes(self, batch_size: int, patch_voxels: int, amp: bool = True, device_type: str = "cuda") -> float:
        """Peak bytes of one SGD step; ``amp``: autocast (bf16/fp16) activations, else fp32."""
        activations = self.activation_bytes_per_voxel * patch_voxels * batch_size
        activations *= self.step_over_saved(amp)
        # weights, gradients, SGD momentum: three fp32 copies
        params = 3 * 4 * self.parameter_count
        if amp:
            params += AMP_WEIGHT_COPY_BYTES * self.parameter_count
        step = activations + params + self.recompute_bytes(batch_size, patch_voxels, device_type)
        if device_type == "cuda":
            return step * ALLOCATOR_OVERHEAD + CONTEXT_BYTES
        return step


def saved_activation_bytes(network: nn.Module, input_shape: tuple[int, ...], device: str = "meta") -> int:
    """Bytes autograd saves for backward in one forward pass of ``network`` on ``input_shape``."""
    network = network.to(device).train()
    # Layers save their weights for backward too; those are counted with the parameters.
    x = torch.zeros(input_shape, device=device, requires_grad=False)
    return saved_bytes(network, x, exclude=list(network.parameters()))


def saved_bytes(function, *inputs: torch.Tensor, exclude: list[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while ``function(*inputs)`` runs, plus its outputs.

    Storages of ``exclude`` (say, parameters) are not counted."""
    seen: dict[int, int] = {}
    # Every packed tensor is held until the pass ends, so that no storage (or object) is
    # freed and its address reused by a later one: keys stay unique and the plan repeatable.
    alive: list[torch.Tensor] = []

    def storage_key(tensor: torch.Tensor) -> int:
        # The StorageImpl's address: views of one storage share it, on the meta device too.
        return tensor.untyped_storage()._cdata

    param_keys = {storage_key(p) for p in exclude}

    def pack(tensor: torch.Tensor):
        try:
            key, size = storage_key(tensor), tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key in param_keys:
            return tensor
        alive.append(tensor)
        # Several ops save the same storage (a conv's input is a norm's output): count it once.
        seen[key] = size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = function(*inputs)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    output_bytes = sum(o.numel() * o.element_size() for o in outputs)
    return sum(seen.values()) + output_bytes


def measure(build, input_channels: int, probe_patch: list[int]) -> MemoryEstimate:
    """Measure a network built by ``build()`` on a probe patch (batch 1)."""
    network = build()
    params = sum(p.numel() for p in network.parameters())
    voxels = 1
    for p in probe_patch:
        voxels *= p
    lengths: dict[nn.Module, int] = {}

    def record_length(module, args):  # checkpointed modules take (batch, length, channels) sequences
        lengths[module] = args[0].shape[1]

    def run(net: nn.Module, device: str) -> int:
        hooks = [m.register_forward_pre_hook(record_length) for m in net.modules() if hasattr(m, "recompute_peak")]
        try:
            return saved_activation_bytes(net, (1, input_channels, *probe_patch), device)
        finally:
            for hook in hooks:
                hook.remove()

    try:
        activation = run(network, "meta")
    except (NotImplementedError, RuntimeError):
        # Some custom kernels have no meta implementation; a real CPU pass works everywhere,
        # but only on a probe small enough not to exhaust memory itself.
        if voxels > CPU_PROBE_MAX_VOXELS:
            raise
        lengths.clear()
        activation = run(build(), "cpu")
    # The functions hold only the modules' sizes, not the modules (a CPU probe's weights are not kept).
    recomputed = [RecomputedRegion(module.recompute_peak(), length / voxels) for module, length in lengths.items()]
    estimate = MemoryEstimate(activation / voxels, params, recomputed)
    estimate.step_over_saved = functools.cache(functools.partial(step_over_saved, build, input_channels, probe_patch,
                                                                 estimate.activation_bytes_per_voxel, params,
                                                                 bool(recomputed)))
    return estimate


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive while it is active, and their peak (fake tensors included)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self._storages.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)  # Python keeps one storage object per live storage
            if key in self._storages:  # a view, or an in-place op's result
                continue
            self._storages.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def build_shapes_only(build: Callable[[], nn.Module], shape_mode) -> nn.Module:
    """``build()`` under ``shape_mode`` (the meta device, a ``FakeTensorMode``: shapes only, no memory).

    Where the build itself needs values (MONAI's SwinUNETR calls ``.item()`` while it builds, which
    such tensors refuse), it builds real CPU weights instead, on a forked random stream so that the
    caller's run draws afterwards what it would have drawn. A build that fails for another reason
    fails again there, with its own error."""
    try:
        with shape_mode:
            return build()
    except Exception:  # noqa: BLE001 - any refusal of the shape-only tensors; a real error recurs below
        with torch.random.fork_rng(devices=[]):
            return build()


def step_over_saved(build, input_channels: int, probe_patch: list[int], saved_bytes_per_voxel: float,
                    parameter_count: int, has_recomputed_regions: bool, autocast: bool) -> float:
    """Peak bytes of a forward and backward pass over the fp32 saved bytes, in fp32 or under autocast.

    What autograd saves is not all a step holds: the backward allocates gradient buffers while
    the saved tensors are still alive (a U-Net's top decoder stage holds the gradients of its
    output, of its skip concatenation and of its input at once), and autocast saves 2-byte copies
    beside fp32 ones (norms, softmax and reductions stay fp32; 3D Swin UNETR's window softmax over
    343 tokens keeps it near fp32). Both are found by running the step on fake CPU tensors
    (``FakeTensorMode``: CPU dispatch, autocast included, shapes and dtypes only, no memory, no
    arithmetic, so the size of the pass costs nothing) and recording the peak of live storage, at
    the probe patch for two batches large enough that activations make the peak: the difference
    grows with the samples only, which leaves out the weights' gradients and autocast's weight
    copies (counted with the parameters). Networks with checkpointed regions get a forward-only
    measurement (see below). On the CPU the estimate then follows the measured peak of real steps
    within -15 % / +11 % (``scripts/bench_arch.py``, README)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    floor = 0.5 if autocast else 1.0  # the saved bytes' own share (autocast keeps at least half of them)
    voxels = math.prod(probe_patch)
    # Activations of ``batch`` samples several times the weights' gradients, which the peak also holds;
    # fake tensors cost nothing per voxel, and 32 samples bound the graph.
    batch = min(32, max(1, math.ceil(8 * 4 * parameter_count / (saved_bytes_per_voxel * voxels))))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    network = build_shapes_only(build, fake)
    network.train()

    from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss

    training_loss = DeepSupervisionLoss(DiceCELoss())
    if has_recomputed_regions:
        # Their recomputation is counted on its own, and a fake backward through many checkpointed
        # blocks costs minutes: the share of what the forward saves (under autocast the scan's and the
        # mLSTM's fp32 inputs keep 4 bytes), by one sample's fake forward, plus the loss's own peak on
        # top of it (the forward's saved tensors are all alive while the loss runs).
        exclude = list(network.parameters())

        def saved(amp: bool) -> int:
            with fake, torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return saved_bytes(network, torch.zeros((1, input_channels, *probe_patch)), exclude=exclude)

        def loss_peak(amp: bool) -> int:
            with fake:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = network(torch.zeros((1, input_channels, *probe_patch)))
                logits = [o.detach().requires_grad_() for o in (out if isinstance(out, (list, tuple)) else [out])]
                live = _LiveBytes()
                with live:
                    training_loss(logits, torch.zeros((1, *probe_patch), dtype=torch.long)).backward()
            return live.peak

        try:
            # Autocast's weight copies are saved too; they are counted with the parameters.
            forward = saved(False)
            return max(floor, (saved(True) - AMP_WEIGHT_COPY_BYTES * parameter_count) / forward if autocast
                       else floor) + loss_peak(autocast) / forward
        except Exception:  # noqa: BLE001 - as below
            return _unmeasured_step_over_saved(autocast)

    def peak(samples: int) -> int:
        live = _LiveBytes()
        with fake:
            x = torch.zeros((samples, input_channels, *probe_patch))
            with live:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = network(x)
                # Training's own loss, outside autocast as the loop runs it: with many classes its fp32
                # softmax, log-softmax and one-hot outgrow the network's activations.
                training_loss(out, torch.zeros((samples, *probe_patch), dtype=torch.long)).backward()
            for parameter in network.parameters():
                parameter.grad = None
        return live.peak

    try:
        # Two batches: the difference grows with the samples only, the weights' part cancels.
        growth = peak(2 * batch) - peak(batch)
    except Exception:  # noqa: BLE001 - an op without a fake implementation
        return _unmeasured_step_over_saved(autocast)
    return max(floor, growth / (saved_bytes_per_voxel * voxels * batch))


def _unmeasured_step_over_saved(autocast: bool) -> float:
    """Where the fake pass cannot run: the saved bytes, scaled as measured on DynUNet under autocast."""
    return AMP_ACTIVATION_FACTOR if autocast else 1.0
