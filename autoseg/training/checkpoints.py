"""Checkpoints that load with ``weights_only=True``: tensors and plain containers only.

A checkpoint holds everything ``--continue`` needs (model, optimiser, gradient scaler,
epoch, schedule length, RNG states, history, split), so a killed run loses at most the
epoch in flight. It is written under a temporary name and renamed.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import CheckpointError
from autoseg.records import atomic_write_bytes


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                                                    cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError("checkpoint does not exist (nothing to continue from)", path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means a file that is not ours
        raise CheckpointError(f"not a valid autoseg checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200]})", path) from None
    needed = {"model", "optimizer", "epoch", "total_epochs", "rng", "history"}
    if not isinstance(content, dict) or not needed <= set(content):
        raise CheckpointError(f"does not hold a training state (needs {sorted(needed)})", path)
    return content
