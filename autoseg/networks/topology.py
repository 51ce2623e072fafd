"""nnU-Net's rule for a U-Net topology, shared by every U-shaped architecture.

nnU-Net v2's ``get_pool_and_conv_props``, written down. At each stage the axes whose feature
map is still at least ``2 * MIN_FEATURE_MAP`` voxels are candidates; of those, the ones whose
spacing is less than twice the finest candidate's are downsampled (stride 2). So a coarse axis
of anisotropic data (5 mm slices against 0.7 mm in-plane, or exactly 2:1) stays at full
resolution until the others have caught up, and an axis that can no longer be pooled does not
hold the others back. A single remaining axis is pooled only while it has at least
``3 * MIN_FEATURE_MAP`` voxels. Kernels are 1 across an axis at least twice as coarse as the
finest (a 3-voxel kernel across thick slices mixes tissue far apart) and 3 from the stage where
an axis first gets there on; the bottleneck's kernel is 3 on every axis. ``MAX_STAGES`` caps the
depth (nnU-Net's own planner has no cap: its 2D plan for PH2's 640x768 patch has 8 stages).
"""

from __future__ import annotations

import math
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
    size = [float(p) for p in patch_size]
    current = [float(s) for s in spacing]
    strides, kernels, kernel = [[1] * dims], [], [1] * dims
    while len(strides) < MAX_STAGES:
        candidates = [a for a in range(dims) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not candidates:
            break
        finest_candidate = min(current[a] for a in candidates)
        pooled = [a for a in candidates if current[a] / finest_candidate < 2]
        if len(pooled) == 1 and size[pooled[0]] < 3 * MIN_FEATURE_MAP:
            break
        finest = min(current)
        kernel = [3 if k == 3 or current[a] / finest < 2 else 1 for a, k in enumerate(kernel)]
        kernels.append(list(kernel))
        strides.append([2 if a in pooled else 1 for a in range(dims)])
        for a in pooled:
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    kernels.append([3] * dims)  # the bottleneck
    features = [min(base_features * 2 ** i, max_features) for i in range(len(strides))]
    topology = UNetTopology(list(patch_size), kernels, strides, features)
    divisor = topology.divisor()
    topology.patch_size = [int(-(-p // d) * d) for p, d in zip(patch_size, divisor)]
    return topology
