"""nnU-Net's rule for a U-Net topology, shared by every U-shaped architecture.

Given a patch and its voxel spacing, an axis is downsampled (stride 2) at the next stage
while its feature map stays at least ``2 * min_feature_map`` voxels and its spacing is at
most twice the finest current spacing. The second condition keeps coarse axes of
anisotropic data (e.g. 5 mm slices against 0.7 mm in-plane) at full resolution until the
others have caught up; such axes also get kernel size 1, since a 3-voxel kernel across
thick slices mixes tissue that is far apart. As in nnU-Net, an axis keeps kernel size 3 from
the stage where it first got it: deeper down, where the in-plane axes have been pooled
past the coarse one (ACDC's bottleneck: 20 mm across slices, 49 mm in-plane), the
in-plane kernel stays 3 rather than falling back to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_FEATURE_MAP = 4
MAX_STAGES = 7


@dataclass
class UNetTopology:
    patch_size: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    features: list[int]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def divisor(self) -> list[int]:
        """Per axis, the number the patch size must be divisible by."""
        div = [1] * len(self.patch_size)
        for stride in self.strides:
            div = [d * s for d, s in zip(div, stride)]
        return div


def unet_topology(patch_size: list[int], spacing: list[float], base_features: int = 32,
                  max_features: int | None = None) -> UNetTopology:
    """Topology for ``patch_size``; the returned patch is rounded up to fit the strides."""
    dims = len(patch_size)
    max_features = max_features or (320 if dims == 3 else 512)
    current_size = [float(p) for p in patch_size]
    current_spacing = [float(s) for s in spacing]
    strides = [[1] * dims]
    kernels = [_kernel(current_spacing)]
    while len(strides) < MAX_STAGES:
        finest = min(current_spacing)
        stride = [2 if (current_size[a] >= 2 * MIN_FEATURE_MAP and current_spacing[a] <= 2 * finest) else 1
                  for a in range(dims)]
        if sum(s == 2 for s in stride) == 0:
            break
        # nnU-Net does not pool a single axis alone unless it is the only one left; keep that
        # guard loose: pooling continues while any axis can be pooled.
        strides.append(stride)
        current_size = [c / s for c, s in zip(current_size, stride)]
        current_spacing = [c * s for c, s in zip(current_spacing, stride)]
        kernels.append([max(k, previous) for k, previous in zip(_kernel(current_spacing), kernels[-1])])
    features = [min(base_features * 2 ** i, max_features) for i in range(len(strides))]
    topology = UNetTopology(list(patch_size), kernels, strides, features)
    divisor = topology.divisor()
    topology.patch_size = [int(-(-p // d) * d) for p, d in zip(patch_size, divisor)]
    return topology


def _kernel(spacing: list[float]) -> list[int]:
    finest = min(spacing)
    return [3 if s <= 2 * finest else 1 for s in spacing]
