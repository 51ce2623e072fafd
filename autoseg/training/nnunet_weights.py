"""nnU-Net v2 checkpoints under autoseg's tensor names: ``PlainConvUNet`` -> ``unet``, ``ResidualEncoderUNet`` -> ``resenc_unet``.

An nnU-Net ``checkpoint_final.pth`` is a dict with ``network_weights`` (the state dict) and
``init_args`` (the plans as a plain dict, read here only for the architecture's class name:
nothing is imported from it). It is loaded with ``weights_only=True`` plus numpy's scalar
and dtype classes (``transfer.NUMPY_ALLOWED``), which its logged history needs.

The mapping is name for name; shapes are checked by the transfer, so a topology that differs
(another kernel, more stages) shows up in the table instead of loading wrong weights.
Two differences are exact by construction:

* autoseg's ``unet`` (MONAI DynUNet) has no bias in the convolutions that InstanceNorm
  follows; nnU-Net's biases there are dropped, which changes nothing, because the norm
  subtracts each channel's mean and so removes any per-channel constant;
* DynUNet's transposed convolutions have a bias only when the unet plan's options say
  ``"transposed_conv_bias": true``; without it nnU-Net's transposed-conv biases are listed as
  unused (the logits then differ slightly until fine-tuning adapts).

The decoder convolutions have nnU-Net's kernels (the level's own, not DynUNet's kernel of the
level below: ``networks/unet.py``), so anisotropic plans such as ACDC's map exactly too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from autoseg.errors import CheckpointError

NNUNET_TO_AUTOSEG = {"PlainConvUNet": "unet", "ResidualEncoderUNet": "resenc_unet"}
BIAS_BEFORE_NORM = "conv bias before InstanceNorm: cancelled by the norm, not needed"


def is_nnunet_checkpoint(content: Any) -> bool:
    return isinstance(content, dict) and "network_weights" in content and "init_args" in content


def nnunet_class_name(content: dict, path: Path) -> str:
    """The network class the checkpoint's plans name (only its last component, as a string)."""
    try:
        init = content["init_args"]
        configuration = init["plans"]["configurations"][init["configuration"]]
        class_name = configuration["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError("an nnU-Net checkpoint without init_args/plans naming its network class", path) from None
    if class_name not in NNUNET_TO_AUTOSEG:
        raise CheckpointError(f"nnU-Net network {class_name} has no autoseg counterpart; known: "
                              f"{sorted(NNUNET_TO_AUTOSEG)}", path)
    return class_name


def nnunet_state_dict(content: dict, path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """(weights under autoseg's names, nnU-Net class name, dropped nnU-Net names with the reason)."""
    class_name = nnunet_class_name(content, path)
    weights = content["network_weights"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError("network_weights is not a state dict of tensors", path)
    # nnU-Net's modules are reachable under several names (all_modules, the decoder's own
    # reference to the encoder); those aliases hold the same tensors and are skipped.
    names = [n for n in weights if ".all_modules." not in n and not n.startswith("decoder.encoder.")]
    rename = _plain_name if class_name == "PlainConvUNet" else _resenc_name
    stages = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"encoder\.stages\.(\d+)\.", n)))
    mapped, dropped = {}, {}
    for name in names:
        target = rename(name, stages)
        if target is None:
            dropped[name] = BIAS_BEFORE_NORM
        elif target == "":
            dropped[name] = "no counterpart in autoseg's network"
        else:
            mapped[target] = weights[name]
    return mapped, class_name, dropped


def _plain_name(name: str, stages: int) -> str | None:
    """PlainConvUNet -> PlannedUNet (DynUNet under ``net.``); None for a bias InstanceNorm cancels."""
    def block(stage: int) -> str:
        if stage == 0:
            return "net.input_block"
        return "net.bottleneck" if stage == stages - 1 else f"net.downsamples.{stage - 1}"

    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name):
        stage, conv, part, kind = int(m.group(1)), int(m.group(2)) + 1, m.group(3), m.group(4)
        return _conv_or_norm(block(stage), conv, part, kind)
    if m := re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name):
        level, conv, part, kind = int(m.group(1)), int(m.group(2)) + 1, m.group(3), m.group(4)
        return _conv_or_norm(f"net.upsamples.{level}.conv_block", conv, part, kind)
    if m := re.fullmatch(r"decoder\.transpconvs\.(\d+)\.(weight|bias)", name):
        return f"net.upsamples.{m.group(1)}.transp_conv.conv.{m.group(2)}"
    if m := re.fullmatch(r"decoder\.seg_layers\.(\d+)\.(weight|bias)", name):
        level = int(m.group(1))
        if level == stages - 2:  # the full-resolution head
            return f"net.output_block.conv.conv.{m.group(2)}"
        return f"net.deep_supervision_heads.{stages - 3 - level}.conv.conv.{m.group(2)}"
    return ""


def _conv_or_norm(block: str, index: int, part: str, kind: str) -> str | None:
    if part == "conv":
        return None if kind == "bias" else f"{block}.conv{index}.conv.weight"
    return f"{block}.norm{index}.{kind}"


def _resenc_name(name: str, stages: int) -> str:
    """ResidualEncoderUNet -> autoseg's ResidualEncoderUNet (same layout, Sequential indices instead of names)."""
    parts = {"conv": "0", "norm": "1"}
    if m := re.fullmatch(r"encoder\.stem\.convs\.0\.(conv|norm)\.(weight|bias)", name):
        return f"stem.{parts[m.group(1)]}.{m.group(2)}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.(conv1|conv2)\.(conv|norm)\.(weight|bias)", name):
        return f"encoder.{m.group(1)}.{m.group(2)}.{m.group(3)}.{parts[m.group(4)]}.{m.group(5)}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.(weight|bias)", name):
        # autoseg's skip is one Sequential (pool, conv, norm): the norm sits one index after the conv.
        index = int(m.group(3)) + (1 if m.group(4) == "norm" else 0)
        return f"encoder.{m.group(1)}.{m.group(2)}.skip.{index}.{m.group(5)}"
    if m := re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.0\.(conv|norm)\.(weight|bias)", name):
        return f"decoder.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"
    if m := re.fullmatch(r"decoder\.transpconvs\.(\d+)\.(weight|bias)", name):
        return f"upsample.{m.group(1)}.{m.group(2)}"
    if m := re.fullmatch(r"decoder\.seg_layers\.(\d+)\.(weight|bias)", name):
        return f"heads.{m.group(1)}.{m.group(2)}"
    return ""
