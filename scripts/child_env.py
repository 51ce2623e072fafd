"""The environment of a benchmark's child process (``autoseg`` commands, a script's own child mode).

The repository goes first on PYTHONPATH and the caller's entries are kept: on the GPU
machine the carried packages are found through PYTHONPATH (``scripts/device_site.sh``),
and a child that lost them would not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with ``extra`` and the repository first on PYTHONPATH, and glibc's huge pages where
    the ``autoseg`` command would set them (``autoseg.allocator``), so that a child started as ``python -c``
    allocates as the command does."""
    from autoseg.allocator import wants_relaunch, with_huge_pages

    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environ = {**os.environ, **extra, "PYTHONPATH": python_path}
    return with_huge_pages(environ) if wants_relaunch(environ) else environ
