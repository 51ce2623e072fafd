"""Swin UNETR (Hatamizadeh et al. 2022) from MONAI: a Swin transformer encoder with a CNN decoder.

MONAI 1.6 dropped the ``img_size`` argument: the network works on any patch whose every
axis is divisible by 32 (a 2-voxel patch embedding, then four 2x patch mergings), and
checks that at forward time. Planning therefore rounds the patch up to multiples of 32
here, and ``check_plan`` refuses other patches before anything is built.

There is no deep supervision (one tensor in both modes): the decoder heads of Swin UNETR
are not designed for it and the reference training recipe does not use it.
"""

from __future__ import annotations

from monai.networks.nets import SwinUNETR
from torch import nn

from autoseg.networks.topology import UNetTopology
from autoseg.planning.plans import ArchitecturePlan

SWIN_DIVISOR = 32
# Widths the planner chooses between, most preferred first: the paper's 48, then narrower
# where 48 leaves too small a patch. Each a multiple of 12 (heads 3, 6, 12, 24 split the embedding).
SWIN_FEATURE_SIZES = (48, 36, 24, 12)
DEFAULT_FEATURE_SIZE = SWIN_FEATURE_SIZES[0]
# Channels of Swin UNETR's six resolution levels (full, 1/2, ..., 1/32) in units of feature_size.
LEVEL_WIDTHS = [1, 1, 2, 4, 8, 16]


def swin_topology(patch_size: list[int], spacing: list[float],
                  feature_size: int = DEFAULT_FEATURE_SIZE) -> UNetTopology:
    """Patch rounded up to multiples of 32; strides and features describe Swin's fixed
    five isotropic downsamplings (spacing cannot change them, so it is ignored).
    A patch of 32 along every axis leaves a single bottleneck voxel, which InstanceNorm
    refuses in training, so one axis is doubled then."""
    dims = len(patch_size)
    patch = [int(-(-p // SWIN_DIVISOR) * SWIN_DIVISOR) for p in patch_size]
    if all(p == SWIN_DIVISOR for p in patch):
        # A 1-voxel bottleneck breaks InstanceNorm in training; double the longest axis asked for.
        patch[max(range(dims), key=lambda a: patch_size[a])] *= 2
    strides = [[1] * dims] + [[2] * dims for _ in range(5)]
    kernels = [[3] * dims for _ in strides]
    features = [feature_size * w for w in LEVEL_WIDTHS]
    return UNetTopology(patch, kernels, strides, features)


def feature_size_of(plan: ArchitecturePlan) -> int:
    return int(plan.options.get("feature_size", DEFAULT_FEATURE_SIZE))


def check_swin_plan(plan: ArchitecturePlan, dimensions: int) -> str | None:
    bad = [p for p in plan.patch_size if p % SWIN_DIVISOR]
    if bad:
        return f"swin_unetr needs every patch axis divisible by {SWIN_DIVISOR}; got {plan.patch_size}"
    if all(p == SWIN_DIVISOR for p in plan.patch_size):
        return f"swin_unetr needs a patch larger than {SWIN_DIVISOR} along some axis (1-voxel bottleneck)"
    if feature_size_of(plan) % 12:
        return f"swin_unetr feature_size must be a multiple of 12; got {feature_size_of(plan)}"
    return None


def build_swin_unetr(plan: ArchitecturePlan, in_channels: int, num_classes: int, dimensions: int,
                     deep_supervision: bool) -> nn.Module:
    # deep_supervision is ignored on purpose: see the module docstring.
    return SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=feature_size_of(plan),
                     spatial_dims=dimensions, use_v2=bool(plan.options.get("use_v2", True)),
                     norm_name="instance")
