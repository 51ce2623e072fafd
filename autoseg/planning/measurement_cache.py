"""Measurements of the memory model kept between runs, so that planning a dataset again takes seconds.

The planner's memory model runs each candidate network's training step on fake tensors
(``networks.memory.step_over_saved``): about a second per topology and four for Swin UNETR, 47 of
the 52 s of planning the synthetic demo set on 2 cores (timed by hand, 2026-12-06; the cache's effect
is ``scripts/bench_planning.py``'s). The result is a number that depends only on what builds and runs
that step: the architecture and its build arguments, the probe patch, autocast, and the code and
library versions that run them. So it is stored under a key of the first ones in a JSON file whose
entries are all dropped when the code changes (a digest of the network and loss sources, and the
versions of torch and MONAI).

Where: ``$AUTOSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoseg``, else ``~/.cache/autoseg``;
``AUTOSEG_CACHE_DIR=off`` turns it off. A cache that cannot be read is ignored and one that cannot be
written is skipped: a plan never depends on the cache being there, only its time does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from autoseg.networks.memory import MemoryEstimate, measure
from autoseg.records import atomic_write_bytes

CACHE_ENV = "AUTOSEG_CACHE_DIR"
FILE_NAME = "memory_measurements.json"
_PACKAGE = Path(__file__).resolve().parents[1]
# Every source file that shapes a measured step: the networks, the memory model and the loss it runs.
_SOURCES = (_PACKAGE / "networks", _PACKAGE / "training" / "loss.py")


def cache_file() -> Path | None:
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "no") else Path(configured) / FILE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autoseg" / FILE_NAME


@functools.cache
def code_version() -> str:
    """Digest of the sources and library versions a measurement ran on; a change drops every entry."""
    import monai
    import torch

    digest = hashlib.sha1(f"torch {torch.__version__} monai {monai.__version__}".encode())
    for source in _SOURCES:
        for path in sorted(source.rglob("*.py")) if source.is_dir() else [source]:
            digest.update(path.relative_to(_PACKAGE).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _read(path: Path) -> dict[str, float]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("code_version") != code_version():
        return {}
    entries = stored.get("entries")
    return {k: float(v) for k, v in entries.items() if isinstance(v, (int, float))} if isinstance(entries, dict) else {}


def _write(path: Path, entries: dict[str, float]) -> None:
    data = json.dumps({"code_version": code_version(), "entries": entries}, indent=0, sort_keys=True).encode()
    try:
        atomic_write_bytes(path, data)  # a reader sees the old file or the new one, never half of one
    except OSError:
        pass  # a read-only home or a full disk: planning goes on, measuring again next time


def remembered(key: str, compute: Callable[[], float]) -> float:
    """The stored number under ``key``, else ``compute()``, stored for next time."""
    path = cache_file()
    if path is None:
        return compute()
    entries = _read(path)
    if key in entries:
        return entries[key]
    value = float(compute())
    # Read again just before writing, under a lock: the planner's worker processes (-np) and other planners
    # add entries meanwhile, and a read-add-write of each without the lock drops the other's entries.
    with _exclusive(path):
        _write(path, {**_read(path), key: value})
    return value


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds an advisory lock on ``path``'s lock file where the platform has one (``fcntl``); without
    one (Windows, a file system that refuses locks) entries can be lost, never the file."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def network_identity(name: str, dimensions: int, in_channels: int, num_classes: int, options: dict[str, Any],
                     strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                     features: Sequence[int]) -> tuple:
    """Everything an architecture's build depends on (the patch is not: it only has to divide by the strides)."""
    return (name, dimensions, in_channels, num_classes, repr(dict(options)), tuple(map(tuple, strides)),
            tuple(map(tuple, kernel_sizes)), tuple(features))


def remembered_estimate(build: Callable[[], nn.Module], in_channels: int, probe: list[int],
                        identity: tuple) -> MemoryEstimate:
    """``networks.memory.measure``, its fake training step (most of its time) remembered under ``identity``."""
    estimate = measure(build, in_channels, probe)
    measured = estimate.step_over_saved
    estimate.step_over_saved = functools.cache(lambda autocast: remembered(
        f"step_over_saved {identity} probe {list(probe)} autocast {autocast}", lambda: measured(autocast)))
    return estimate
