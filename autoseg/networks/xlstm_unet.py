"""xLSTM-UNet (Chen et al. 2024): a residual U-Net whose encoder stages end in Vision-LSTM blocks.

Each encoder stage: residual conv blocks (``resenc_unet.py``), then ``vil_blocks`` Vision-LSTM
(ViL, Alkin et al. 2024) blocks over the stage's voxels in raster order. ViL alternates the
scan direction: odd blocks flip the sequence, so after two blocks every voxel has seen
context from both sides of the raster order. Decoder: residual blocks, as in U-Mamba,
whose code base xLSTM-UNet builds on.

The mLSTM cell is our own chunkwise implementation (``mlstm.py``), not the ``xlstm`` /
``mlstm_kernels`` packages: those pull Triton/CUDA wheels and we need CPU training too.
At full resolution a stage's sequence is every voxel of the patch; in training the cell is
gradient-checkpointed so its (L x chunk) score matrices are not kept for backward.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoseg.networks.mlstm import mlstm_chunkwise, recompute_peak_bytes
from autoseg.networks.precision import without_autocast
from autoseg.networks.resenc_unet import ResidualEncoderUNet
from autoseg.planning.plans import ArchitecturePlan

XLSTM_BLOCKS_PER_STAGE = [2]


class MLSTMLayer(nn.Module):
    """ViL's mLSTM layer: up-projection to (x, z); x through a causal depthwise conv + SiLU
    gives q and k, x itself gives v; exponential input and sigmoid forget gates per head from
    (q, k, v); per-head normalised cell output plus a learnable skip of the conv path, gated
    by SiLU(z), down-projected."""

    def __init__(self, dim: int, heads: int = 4, expand: int = 2, conv_size: int = 4, chunk_size: int = 64):
        super().__init__()
        inner = expand * dim
        heads = max(1, min(heads, inner // 4))
        while inner % heads:
            heads -= 1
        self.heads, self.chunk_size, self.head_dim = heads, chunk_size, inner // heads
        self.up = nn.Linear(dim, 2 * inner)
        self.conv = nn.Conv1d(inner, inner, conv_size, groups=inner, padding=conv_size - 1)
        self.q, self.k, self.v = (nn.Linear(inner, inner, bias=False) for _ in range(3))
        self.input_gate = nn.Linear(3 * inner, heads)
        self.forget_gate = nn.Linear(3 * inner, heads)
        # xLSTM's initialisation: forget gates open (bias 3..6, memory spans hundreds of
        # tokens), input gates near zero.
        with torch.no_grad():
            self.forget_gate.weight.zero_()
            self.forget_gate.bias.copy_(torch.linspace(3.0, 6.0, heads))
            self.input_gate.weight.zero_()
            self.input_gate.bias.normal_(0.0, 0.1)
        self.out_norm = nn.GroupNorm(heads, inner)
        self.skip = nn.Parameter(torch.ones(inner))
        self.down = nn.Linear(inner, dim)

    def recompute_peak(self):
        """The memory model's transient term as a function of (batch, length, device type):
        ``mlstm.recompute_peak_bytes``."""
        return partial(recompute_peak_bytes, self.heads, self.head_dim, self.chunk_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (batch, L, dim)
        batch, length, _ = tokens.shape
        x, z = self.up(tokens).chunk(2, dim=-1)
        x_conv = F.silu(self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2))
        q, k, v = self.q(x_conv), self.k(x_conv), self.v(x)
        gates_in = torch.cat([q, k, v], dim=-1)
        i_pre, f_pre = self.input_gate(gates_in).transpose(1, 2), self.forget_gate(gates_in).transpose(1, 2)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        args = (q.float(), k.float(), v.float(), i_pre.float(), f_pre.float(), self.chunk_size)
        with without_autocast(tokens.device):  # exp gates need float32
            # Checkpointed whenever training, at every sequence length, so that memory is linear in
            # the patch's voxels as the planner's memory model assumes.
            if torch.is_grad_enabled():
                h = checkpoint(mlstm_chunkwise, *args, use_reentrant=False)
            else:
                h = mlstm_chunkwise(*args)
        h = h.transpose(1, 2).reshape(batch, length, -1).to(x.dtype)
        h = self.out_norm(h.transpose(1, 2)).transpose(1, 2) + self.skip * x_conv
        return self.down(h * F.silu(z))


class VisionLSTMStack(nn.Module):
    """Feature map -> voxel sequence -> pre-norm residual mLSTM blocks, every other one on the
    reversed sequence -> feature map."""

    def __init__(self, channels: int, depth: int, **layer_options):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(depth))
        self.layers = nn.ModuleList(MLSTMLayer(channels, **layer_options) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for index, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            if index % 2:
                tokens = tokens + layer(norm(tokens.flip(1))).flip(1)
            else:
                tokens = tokens + layer(norm(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, *spatial)


def build_xlstm_unet(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                     deep_supervision: bool) -> nn.Module:
    options = {k: plan.options[k] for k in ("heads", "expand", "chunk_size") if k in plan.options}
    depth = int(plan.options.get("vil_blocks", 2))
    mixers = [VisionLSTMStack(f, depth, **options) for f in plan.features]
    return ResidualEncoderUNet(plan, in_channels, num_classes, dimensions, deep_supervision,
                               plan.options.get("blocks_per_stage", XLSTM_BLOCKS_PER_STAGE),
                               stage_mixers=mixers, residual_decoder=True)
