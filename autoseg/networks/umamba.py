"""U-Mamba (Ma, Li, Wang 2024): a residual U-Net with Mamba layers over the flattened feature map.

Two variants, as in the paper:

* ``umamba_bot``: one Mamba layer at the bottleneck only (cheap: the bottleneck has few voxels);
* ``umamba_enc``: a Mamba layer after every encoder stage, full resolution included, where
  the sequence is every voxel of the patch; the chunked, checkpointed scan of
  ``selective_scan.py`` keeps that within memory on a CPU.

The convolutional part is the residual-encoder U-Net of ``resenc_unet.py`` with U-Mamba's
settings: two residual blocks per stage (nnU-Net's two convolutions per stage) and residual
decoder blocks. The Mamba block is Mamba-1 (Gu & Dao 2023) as U-Mamba uses it: d_state 16,
d_conv 4, expand 2.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.precision import without_autocast
from autoseg.networks.resenc_unet import ResidualEncoderUNet
from autoseg.networks.selective_scan import recompute_peak_bytes, selective_scan
from autoseg.planning.plans import ArchitecturePlan

UMAMBA_BLOCKS_PER_STAGE = [2]


class MambaBlock(nn.Module):
    """in_proj -> (x, z); x: causal depthwise conv1d, SiLU, selective SSM with input-dependent
    delta, B, C and a D skip; gated by SiLU(z); out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, chunk_size: int = 32):
        super().__init__()
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state = d_state
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # Mamba's initialisation: step sizes log-uniform in [dt_min, dt_max] through the bias
        # (inverse softplus), A = -(1..d_state) per channel (S4D-real), D = 1.
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def recompute_peak(self):
        """The memory model's transient term as a function of (batch, length, device type):
        ``selective_scan.recompute_peak_bytes``."""
        return partial(recompute_peak_bytes, self.d_inner, self.d_state, self.chunk_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (batch, L, d_model)
        length = tokens.shape[1]
        x, z = self.in_proj(tokens).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: drop the tail
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        # The scan runs in float32 even under autocast: exp/cumulative products lose too much in bf16.
        with without_autocast(tokens.device):
            y = selective_scan(x.float(), delta.float(), -torch.exp(self.A_log.float()), B.float(), C.float(),
                               self.D.float(), chunk_size=self.chunk_size)
        return self.out_proj(y.to(z.dtype) * F.silu(z))


class MambaLayer(nn.Module):
    """Feature map -> voxel sequence (raster order) -> LayerNorm + Mamba, residual -> feature map.

    The residual keeps the convolutional features flowing while the freshly initialised
    SSM is still learning; U-Mamba's later code adds it too.
    """

    def __init__(self, channels: int, **mamba_options):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = MambaBlock(channels, **mamba_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.mamba(self.norm(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, *spatial)


def _mamba_options(plan: ArchitecturePlan) -> dict:
    keys = ("d_state", "d_conv", "expand", "chunk_size")
    return {k: plan.options[k] for k in keys if k in plan.options}


def _build(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
           deep_supervision: bool, every_stage: bool) -> nn.Module:
    n = len(plan.features)
    options = _mamba_options(plan)
    mixers = [MambaLayer(plan.features[s], **options) if (every_stage or s == n - 1) else None for s in range(n)]
    return ResidualEncoderUNet(plan, in_channels, num_classes, dimensions, deep_supervision,
                               plan.options.get("blocks_per_stage", UMAMBA_BLOCKS_PER_STAGE),
                               stage_mixers=mixers, residual_decoder=True)


def build_umamba_bot(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                     deep_supervision: bool) -> nn.Module:
    return _build(plan, in_channels, num_classes, dimensions, deep_supervision, every_stage=False)


def build_umamba_enc(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                     deep_supervision: bool) -> nn.Module:
    return _build(plan, in_channels, num_classes, dimensions, deep_supervision, every_stage=True)
