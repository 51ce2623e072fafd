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


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: NVIDIA compute capability 8.0 or newer (A100, RTX 30xx, H100 ...).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is emulated (V100, T4: compute
    capability 7.x), which is several times slower than fp16 there, and it asks about the
    current device rather than this one. ROCm devices are taken at PyTorch's word (it says yes).
    """
    if torch.version.hip:
        return True
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def cuda_autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it natively, fp16 elsewhere (training adds a gradient scaler for fp16)."""
    return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16, AMX), as oneDNN reports it; emulated bf16
    elsewhere is slower than float32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())
