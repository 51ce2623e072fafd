"""Checkpoints that load with ``weights_only=True``: tensors and plain containers only.

A checkpoint holds everything ``--continue`` needs: model, optimiser, gradient scaler,
schedule (``scheduler``), epoch, RNG states of python, numpy, torch and CUDA for every
rank, the logging history, the split and the plan identity (dataset, configuration,
architecture, patch, batch). It is written under a temporary name and renamed, so a
kill leaves the previous one intact and loses at most the epoch in flight. Anything
else found under a checkpoint's name (a pickled object, a truncated file, a bare
tensor) is refused with ``CheckpointError`` naming the file; nothing in it is executed.
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

REQUIRED = ("model", "optimizer", "scheduler", "epoch", "rng", "history", "plan", "split")


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and tuples (numpy's key array as an int64 tensor)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], reseed: int) -> str | None:
    """Restore every generator saved in ``state``; returns a one-line note when the GPUs differ.

    ``--continue`` may see another number of GPUs than the run that saved (fewer free, a
    bigger machine): the CUDA states of the GPUs present in both are restored, the other
    visible GPUs' generators are seeded from ``reseed``, and the note says so. Without CUDA
    the saved CUDA states are left unused.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(visible):
        if index < len(saved):
            torch.cuda.set_rng_state(saved[index], index)
        elif torch.cuda.is_initialized():
            torch.cuda.default_generators[index].manual_seed(reseed + index)
        # else: CUDA has not started in this process (``--device cpu`` on a GPU machine), and
        # ``default_generators`` is still an empty tuple; the seed that seed_everything queued applies
        # if it ever starts. (``torch.cuda.set_rng_state`` above is queued the same way.)
    if saved and visible != len(saved):
        restored = min(visible, len(saved))
        return (f"the checkpoint holds the CUDA random state of {len(saved)} GPU(s), {visible} visible now: "
                f"{restored} restored, {max(visible - len(saved), 0)} seeded afresh"
                + (f", {len(saved) - visible} unused" if len(saved) > visible else ""))
    return None


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded without executing anything; else ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint does not exist (nothing to continue from)", path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and weights-only errors all mean "not ours"
        raise CheckpointError(f"not a valid autoseg checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})", path) from None
    if not isinstance(content, dict) or not set(REQUIRED) <= set(content):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"does not hold a training state (needs {list(REQUIRED)}, found {found})", path)
    if not isinstance(content["model"], dict) or not all(isinstance(v, torch.Tensor) for v in content["model"].values()):
        raise CheckpointError("its 'model' is not a state dict of tensors", path)
    return content


def check_identity(content: dict[str, Any], plan: dict[str, Any], split: dict[str, Any], path: Path) -> None:
    """Refuse to continue from a checkpoint written for another plan or split."""
    for what, expected in (("plan", plan), ("split", split)):
        found = content.get(what)
        if found != expected:
            differing = sorted(k for k in set(expected) | set(found or {}) if (found or {}).get(k) != expected.get(k))
            raise CheckpointError(f"was written for a different {what} (differs in {differing}); "
                                  "start without --continue or restore the original plans/splits", path)
