"""Bad inputs and faults shared by the hardening tests: damaged image files, a command's outcome,
permissions that apply to root too, and a disk that fills up.

Every damage is a function of the file it breaks, paired with the words the one stderr
line must hold, so the same corpus is fed to every command that reads such a file.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import json
import os
import resource
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg.cli import main
from autoseg.io.images import read_image


# ---- damaged image files -------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _into_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _unreadable(path: Path) -> None:
    path.chmod(0)  # only refused where permissions are enforced: see ``permissions_enforced``


def _enormous_header(path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 68))  # 108 TB announced, 68 bytes given


def _edit_nifti(path: Path, change) -> None:
    image = nib.load(str(path))
    data, affine, header = change(np.asanyarray(image.dataobj), image.affine.copy(), image.header.copy())
    if header is not None:
        header.set_data_dtype(data.dtype)  # else nibabel casts back: 0.5 would be written as 0 or 1
    nib.save(nib.Nifti1Image(data, affine, header), str(path))


def _pixdim(index: int, value: float):
    """Overwrite one voxel size in the header bytes (nibabel would recompute it from the affine)."""
    def damage(path: Path) -> None:
        raw = bytearray(gzip.decompress(path.read_bytes()))
        struct.pack_into("<f", raw, 76 + 4 * index, value)
        path.write_bytes(gzip.compress(bytes(raw)))
    return damage


def _four_d(path: Path) -> None:
    _edit_nifti(path, lambda d, a, h: (np.stack([d, d], -1), a, None))


def _skewed(path: Path) -> None:
    def change(data, affine, header):
        affine[0, 1] = 0.9 * affine[0, 0]
        return data, affine, None
    _edit_nifti(path, change)


def _voxels(function):
    return lambda path: _edit_nifti(path, lambda d, a, h: (function(np.asarray(d)), a, h))


# name -> (damage(path), words the error line must hold); the same for images, labels and predictions.
FILE_FAULTS = {
    "truncated gzip": (_truncate, "truncated"),
    "wrong magic bytes": (lambda p: p.write_bytes(b"GIF89a" * 100), "cannot be read as an image"),
    "empty file": (lambda p: p.write_bytes(b""), "file is empty"),
    "directory named like an image": (_into_directory, "is a directory"),
    "no read permission": (_unreadable, "permission denied"),
    "enormous header": (_enormous_header, "header claims size [30000, 30000, 30000]"),
    "zero spacing": (_pixdim(2, 0.0), "spacing"),
    "negative spacing": (_pixdim(1, -1.0), "spacing"),
    "4D image": (_four_d, "has 4 dimensions"),
    "non-orthonormal direction": (_skewed, "orthonormal"),
}
# Faults of the voxel values of an image (labels have their own).
INTENSITY_FAULTS = {
    "NaN intensities": (_voxels(lambda a: np.where(a > a.mean(), np.nan, a).astype(np.float32)), "NaN or Inf"),
    "Inf intensities": (_voxels(lambda a: np.where(a > a.mean(), np.inf, a).astype(np.float32)), "NaN or Inf"),
    "all-zero image": (_voxels(np.zeros_like), "all zeros"),
}
LABEL_FAULTS = {
    "non-integer label values": (_voxels(lambda a: a.astype(np.float32) + 0.5), "non-integer values"),
    "negative label values": (_voxels(lambda a: a.astype(np.int16) - 1), "label values must lie in 0..32767"),
    "label values not in dataset.json": (_voxels(lambda a: np.where(np.arange(a.size).reshape(a.shape) % 97, a, 7)
                                                 .astype(a.dtype)), "label values [7] are not in dataset.json"),
}


def needs_permissions(fault: str) -> contextlib.AbstractContextManager:
    """Faults about permissions are only faults where permissions are enforced."""
    return permissions_enforced() if "permission" in fault else contextlib.nullcontext()


# ---- running a command ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list[str], capsys) -> Outcome:
    """``autoseg ARGV`` in this process (no interpreter start-up), with its exit code and output."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def assert_refused(outcome: Outcome, file: str | Path, problem: str, code: int = 2) -> None:
    """Exit ``code``, one stderr line naming ``file`` and ``problem``, no traceback."""
    name = Path(file).name if isinstance(file, Path) else file
    assert outcome.code == code, f"exit {outcome.code}, stderr:\n{outcome.err}"
    assert "Traceback" not in outcome.err, outcome.err
    assert any(name in line and problem.lower() in line.lower() for line in outcome.err.splitlines()), \
        f"no stderr line names {name!r} and {problem!r}:\n{outcome.err}"
    assert all(line.startswith("autoseg: ") for line in outcome.err.splitlines() if line.strip()), \
        outcome.err


def files_under(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file (path -> size, modification time) under ``folders``; 'nothing was written' compares two."""
    found = {}
    for folder in folders:
        if folder.exists():
            found.update({str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")
                          if p.is_file()})
    return found


def assert_complete(path: Path) -> None:
    """``path`` holds a whole file of its kind, not the first part of one."""
    name = path.name
    if name.endswith(".json") or name.endswith(".jsonl"):
        lines = path.read_text().splitlines() if name.endswith(".jsonl") else [path.read_text()]
        assert all(json.loads(line) is not None for line in lines), path
    elif name.endswith(".npy"):
        np.load(path, allow_pickle=False)
    elif name.endswith(".nii.gz"):
        read_image(path)  # refuses a truncated stream
    elif name.endswith(".pt"):
        import torch

        assert isinstance(torch.load(path, weights_only=True), dict), path
    elif name.endswith(".png"):
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
    elif name.endswith(".csv"):
        assert path.read_text().endswith("\n"), path
    else:
        raise AssertionError(f"no completeness check for {path}")


# ---- the environment -----------------------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAP_VERSION_3 = 0x20080522
_DAC_CAPABILITIES = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


def _capabilities(data=None):
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_CAP_VERSION_3, 0)
    call = libc.capget if data is None else libc.capset
    data = data if data is not None else (_CapData * 2)()
    if call(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return data


@contextlib.contextmanager
def permissions_enforced():
    """File permission bits hold for this thread even when it runs as root.

    Root reads a ``chmod 000`` file because of CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH;
    they are dropped from this thread's effective set (kept in the permitted set, so they
    come back afterwards). Threads and processes started meanwhile inherit the drop, so
    the real code paths meet a real EACCES.
    """
    if os.geteuid() != 0:
        yield
        return
    try:
        data = _capabilities()
        saved = data[0].effective
        data[0].effective &= ~_DAC_CAPABILITIES
        _capabilities(data)
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot drop root's permission override (capset: {exc}); permission faults need it")
    try:
        yield
    finally:
        data[0].effective = saved
        _capabilities(data)


@contextlib.contextmanager
def disk_full_after(limit_bytes: int):
    """Every write past ``limit_bytes`` of a file fails (EFBIG), as writes on a full disk fail (ENOSPC).

    RLIMIT_FSIZE for this process, with SIGXFSZ ignored so that the write returns an error
    instead of killing the process; both are restored afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
