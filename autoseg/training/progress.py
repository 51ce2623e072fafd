"""What the user sees of training: one JSON line per epoch and ``progress.png``, redrawn every epoch."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from autoseg.records import atomic_write_bytes


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in history).encode())


def draw_progress(path: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train loss")
    axes[0].plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    twin = axes[0].twinx()
    twin.plot(epochs, [h["pseudo_dice_mean"] for h in history], "g:", label="pseudo Dice")
    twin.plot(epochs, [h["pseudo_dice_ema"] for h in history], "g-", label="pseudo Dice (EMA)")
    twin.set_ylim(0, 1)
    axes[0].legend(loc="upper left")
    twin.legend(loc="upper right")
    axes[1].plot(epochs, [h["epoch_seconds"] for h in history], label="epoch")
    axes[1].plot(epochs, [h.get("data_wait_seconds", 0.0) for h in history], label="waiting for batches")
    axes[1].legend(loc="upper right")
    axes[1].set_ylabel("epoch time (s)")
    axes[2].plot(epochs, [h["lr"] for h in history])
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("epoch")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
