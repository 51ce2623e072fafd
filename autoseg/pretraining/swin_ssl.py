"""Swin UNETR's three self-supervised tasks (Tang et al., CVPR 2022): inpainting, rotation, contrastive.

Each patch of the batch becomes two views, each rotated by its own random multiple of 90
degrees in one plane (label 0-3) and masked as in inpainting (the paper's random inner
cutout; here the inpainting cubes, blanked to 0). The network runs on all 2B views (on the
CPU a few views per call, as training splits its batch; every layer of Swin UNETR works per
sample, so the outputs are the same); a forward hook keeps the Swin encoder's bottleneck (``swinViT``'s last output, 16 x
feature_size channels at 1/32), which feeds two small heads after global average pooling:

* rotation: a linear classifier over the 4 rotations, cross-entropy;
* contrastive: a linear projection to 512, NT-Xent (MONAI's ``ContrastiveLoss``,
  temperature 0.5) between the two views of each patch, the other 2B - 2 views as negatives;
* inpainting: the decoder's reconstruction of the rotated views, squared error on the
  masked voxels (``MaskedReconstructionLoss``).

The loss is their sum, each weighted 1 as in the paper. The heads live on the network as
``ssl_heads`` (so the checkpoint, the optimiser and ``--continue`` include them) and are
listed with the reconstruction head in ``pretrain_head_names``: ``train --pretrained``
drops them. The paper reads single tokens of the bottleneck and rebuilds with a light
transposed-convolution decoder; here both heads pool globally and the reconstruction uses
Swin UNETR's own decoder, so that decoder is pre-trained too.

The rotation plane is the last pair of equal spatial patch axes: y-x (around z) where the
patch is square in-plane, as in the paper; the image plane in 2D. A patch with no two equal
axes cannot be rotated by 90 degrees in place and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import ContrastiveLoss
from torch import nn

from autoseg.errors import UsageError
from autoseg.networks.call_size import call_in_parts
from autoseg.pretraining.inpainting import MASK_RATIO, MaskedReconstructionLoss, random_cube_mask

TASK = "inpainting+rotation+contrastive"
ROTATIONS = 4  # 0, 90, 180, 270 degrees
PROJECTION_SIZE = 512
TEMPERATURE = 0.5
HEADS_ATTRIBUTE = "ssl_heads"


def rotation_axes(patch_size: list[int]) -> tuple[int, int]:
    """The two tensor dimensions (of ``B, C, *spatial``) of the rotation plane: the last pair of equal axes."""
    spatial = len(patch_size)
    for first in range(spatial - 2, -1, -1):
        for second in range(spatial - 1, first, -1):
            if patch_size[first] == patch_size[second]:
                return first + 2, second + 2
    raise UsageError(f"--task {TASK} rotates the patch by 90 degrees in a plane of two equal axes; the plan's "
                     f"patch {list(patch_size)} has none (edit patch_size in the plans, or use --task inpainting)")


def rotate(batch: torch.Tensor, quarter_turns: torch.Tensor, axes: tuple[int, int]) -> torch.Tensor:
    """Sample ``i`` of ``batch`` rotated by ``quarter_turns[i]`` x 90 degrees (``torch.rot90``) in ``axes``."""
    plane = (axes[0] - 1, axes[1] - 1)  # one sample has no batch dimension
    return torch.stack([torch.rot90(sample, int(k), plane) for sample, k in zip(batch, quarter_turns.tolist())])


class SelfSupervisedHeads(nn.Module):
    """Global average pooling of the bottleneck, then the rotation classifier and the contrastive projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.rotation = nn.Linear(channels, ROTATIONS)
        self.contrastive = nn.Linear(channels, PROJECTION_SIZE)

    def forward(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = bottleneck.flatten(2).mean(2)
        return self.rotation(pooled), self.contrastive(pooled)


def attach_heads(network: nn.Module, bottleneck_channels: int) -> list[str]:
    """Adds ``ssl_heads`` to a MONAI ``SwinUNETR`` (its forward ignores them); returns their state-dict names."""
    heads = SelfSupervisedHeads(bottleneck_channels)
    reference = next(network.parameters(), None)  # the heads take the network's device and dtype
    if reference is not None:
        heads.to(device=reference.device, dtype=reference.dtype)
    network.add_module(HEADS_ATTRIBUTE, heads)
    return sorted(f"{HEADS_ATTRIBUTE}.{name}" for name in heads.state_dict())


@dataclass
class SelfSupervisedOutputs:
    reconstruction: torch.Tensor  # (2B, C, *spatial): the decoder's rebuild of the masked, rotated views
    mask: torch.Tensor  # (2B, 1, *spatial): 1 where masked
    quarter_turns: torch.Tensor  # (2B,) the rotation labels; views i and B + i come from patch i
    rotation_logits: torch.Tensor  # (2B, 4)
    embeddings: torch.Tensor  # (2B, 512)


class RotationContrastiveInpainting(nn.Module):
    """Wraps a Swin UNETR with ``ssl_heads``: two rotated, masked views per patch -> ``SelfSupervisedOutputs``."""

    def __init__(self, network: nn.Module, axes: tuple[int, int], ratio: float = MASK_RATIO,
                 views_per_call: int | None = None):
        super().__init__()
        self.network, self.axes, self.ratio = network, axes, ratio
        self.views_per_call = views_per_call  # None: all 2B views in one call (networks/call_size.py)
        self._bottleneck: list[torch.Tensor] = []
        network.swinViT.register_forward_hook(lambda module, args, output: self._bottleneck.append(output[-1]))

    def forward(self, image: torch.Tensor) -> SelfSupervisedOutputs:
        views = torch.cat([image, image])
        quarter_turns = torch.randint(0, ROTATIONS, (views.shape[0],))
        views = rotate(views, quarter_turns, self.axes)
        mask = random_cube_mask(tuple(views.shape), self.ratio, views.device)
        self._bottleneck.clear()
        reconstruction = call_in_parts(self.network, views * (1 - mask), self.views_per_call)
        # The heads see all 2B bottlenecks at once (one per call): the contrastive loss pairs views across calls.
        bottleneck = torch.cat(self._bottleneck) if len(self._bottleneck) > 1 else self._bottleneck[0]
        self._bottleneck.clear()
        rotation_logits, embeddings = getattr(self.network, HEADS_ATTRIBUTE)(bottleneck)
        return SelfSupervisedOutputs(reconstruction, mask, quarter_turns.to(views.device), rotation_logits,
                                     embeddings)


class RotationContrastiveInpaintingLoss(nn.Module):
    """Inpainting + rotation cross-entropy + NT-Xent, weights 1; keeps each part's running sum for the log."""

    def __init__(self, axes: tuple[int, int], temperature: float = TEMPERATURE):
        super().__init__()
        self.axes = axes
        self.reconstruction = MaskedReconstructionLoss()
        self.contrastive = ContrastiveLoss(temperature=temperature)
        self._sums: dict[str, torch.Tensor] = {}  # kept on the device: no host sync per step
        self._steps = 0

    def parts(self, outputs: SelfSupervisedOutputs, target: torch.Tensor) -> dict[str, torch.Tensor]:
        rotated_target = rotate(torch.cat([target, target]), outputs.quarter_turns, self.axes)
        first, second = outputs.embeddings.float().chunk(2)
        return {"inpainting": self.reconstruction((outputs.reconstruction, outputs.mask), rotated_target),
                "rotation": nn.functional.cross_entropy(outputs.rotation_logits.float(), outputs.quarter_turns),
                "contrastive": self.contrastive(first, second)}

    def forward(self, outputs: SelfSupervisedOutputs, target: torch.Tensor) -> torch.Tensor:
        parts = self.parts(outputs, target)
        for name, value in parts.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach()
        self._steps += 1
        return sum(parts.values())

    def epoch_means(self) -> dict[str, float]:
        """Each part's mean since the last call (one epoch), then starts over."""
        means = {name: float(total) / max(1, self._steps) for name, total in self._sums.items()}
        self._sums, self._steps = {}, 0
        return means
