"""Regions of a network that must run in float32 even when the step runs under autocast."""

from __future__ import annotations

import torch


def without_autocast(device: torch.device) -> torch.autocast:
    """Turn autocast off for ``device``'s type.

    The planner's memory model runs networks on the ``meta`` device, for which
    ``torch.autocast`` has no dtype and raises; autocast is never on there, so the
    CPU's context (disabled) stands in for it.
    """
    device_type = "cpu" if device.type == "meta" else device.type
    return torch.autocast(device_type=device_type, enabled=False)
