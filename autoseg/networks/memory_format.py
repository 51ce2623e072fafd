"""Channels-last networks for the CPU: oneDNN's convolutions run about twice as fast there.

oneDNN, PyTorch's CPU convolution library, computes in channels-last ("NDHWC"). Given
PyTorch's default layout (NCDHW) it reorders every convolution's input and output, and at a
U-Net's full resolution, 32 channels of 1.1 M voxels (ACDC 3d_fullres), those reorders cost
as much as the convolution: a 1x3x3 convolution there took 248 ms in bf16, 87 ms with the
tensor already channels-last (2026-12-06, this 2-core CPU).

What kept the layout from paying before (README, ``scripts/bench_memory_format.py``: 0.92x to
1.35x the default layout's time) is instance normalisation: ``F.instance_norm`` runs batch
norm on a ``(1, B*C, voxels)`` view, which channels-last memory cannot give, so it copies to
the default layout and back at every norm; ``F.group_norm`` with one group per channel keeps
the layout, but its channels-last backward is 23x slower (953 against 41 ms there).
``ChannelsLastInstanceNorm`` normalises each image as batch norm of its ``(voxels,
channels)`` view, which for channels-last memory is a view, not a copy: the statistics
batch norm computes per column of that matrix are exactly instance norm's per channel.

``ChannelsLast`` wraps a network for prediction on the CPU: its convolution weights are
made channels-last once and every input on the way in. Parameter names do not change
(the norms keep their ``weight`` and ``bias``), so checkpoints load the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.registry import ARCHITECTURES


def runs_channels_last(architecture: str, dimensions: int, device: torch.device, training: bool = False) -> bool:
    """Whether the network runs channels-last: on the CPU, where the registry's ``cpu_channels_last`` says
    (prediction, measured per architecture); training only for 3D, whose steps were the ones to gain."""
    return (device.type == "cpu" and dimensions in ARCHITECTURES[architecture].cpu_channels_last
            and (not training or dimensions == 3))


def channels_last_format(dimensions: int) -> torch.memory_format:
    return torch.channels_last_3d if dimensions == 3 else torch.channels_last


class ChannelsLastInstanceNorm(nn.Module):
    """``nn.InstanceNorm2d/3d(affine=True)`` (no running statistics) computed in, and returning,
    channels-last memory whatever the input's layout."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (4, 5) or x.shape[2:].numel() < 2:
            # Instance norm refuses a single voxel per channel in training: the library's own path and error.
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        # A layer that gave up the layout (3D average pooling on the CPU returns the default one, as in ResEnc's
        # downsampling skips) is brought back here, once, instead of every convolution after it reordering.
        x = x.contiguous(memory_format=channels_last_format(x.dim() - 2))
        to_last = (0, *range(2, x.dim()), 1)
        images = []
        for image in x.split(1):  # one image at a time: batch norm pools over whatever the matrix's rows hold
            last = image.permute(to_last)  # (1, *spatial, C): contiguous, so the reshape below is a view
            rows = F.batch_norm(last.reshape(-1, x.shape[1]), None, None, self.weight, self.bias,
                                training=True, momentum=0.0, eps=self.eps)
            images.append(rows.view(last.shape))
        joined = images[0] if len(images) == 1 else torch.cat(images)
        return joined.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


def use_channels_last_instance_norm(network: nn.Module) -> nn.Module:
    """Replaces, in place, every affine instance norm without running statistics by
    ``ChannelsLastInstanceNorm`` sharing its parameters; returns ``network``."""
    for name, child in network.named_children():
        if isinstance(child, (nn.InstanceNorm2d, nn.InstanceNorm3d)) and child.affine \
                and not child.track_running_stats:
            setattr(network, name, ChannelsLastInstanceNorm(child))
        else:
            use_channels_last_instance_norm(child)
    return network


class ChannelsLast(nn.Module):
    """``network`` run in channels-last memory: weights converted once, each input on the way in.
    The outputs are channels-last too (equal values; any code indexing them is unaffected)."""

    def __init__(self, network: nn.Module, dimensions: int):
        super().__init__()
        self.memory_format = channels_last_format(dimensions)
        self.network = use_channels_last_instance_norm(network).to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor):
        return self.network(x.contiguous(memory_format=self.memory_format))
