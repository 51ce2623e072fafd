"""The CUDA precision decision per device class, with the device's compute capability mocked.

The capabilities are NVIDIA's published ones; bf16 tensor cores arrived with Ampere (8.0).
``torch.cuda.is_bf16_supported()`` is made to say yes everywhere, as it does on a V100 or T4
where it counts emulation: the decision must not follow it.
"""

from __future__ import annotations

import pytest
import torch

from autoseg.inference.predictor import inference_autocast_dtype
from autoseg.training.fold import TrainingOptions, autocast_dtype

DEVICES = [("V100", (7, 0), torch.float16), ("T4", (7, 5), torch.float16), ("A100", (8, 0), torch.bfloat16),
           ("RTX 3090", (8, 6), torch.bfloat16), ("H100/H200", (9, 0), torch.bfloat16)]


@pytest.mark.parametrize("name, capability, expected", DEVICES, ids=[d[0] for d in DEVICES])
def test_bf16_only_where_the_gpu_has_it_natively_else_fp16(name, capability, expected, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    device = torch.device("cuda", 1)
    assert autocast_dtype(device, TrainingOptions()) == expected  # fp16 means the fold adds a gradient scaler
    assert inference_autocast_dtype(device) == expected
    assert all(torch.device(d) == device for d in asked), "the capability of the device used, not the current one"
    assert autocast_dtype(device, TrainingOptions(amp=False)) is None

