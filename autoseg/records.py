"""Typed records that stages hand each other, saved as JSON.

A record is a plain dataclass. ``save_json`` writes it atomically (temporary name,
then rename) with sorted keys and a fixed float format, so the same record always
gives a byte-identical file; ``load_record`` validates the schema version and the
field names before building the dataclass, so a hand-edited file with a typo fails
with a message that names the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

from autoseg.errors import AutosegError, UsageError

T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


# Every temporary file or folder autoseg writes is named TEMPORARY_PREFIX + "HOST.PID-" + ... +
# the final name, so that what a killed process left behind can be recognised and removed.
TEMPORARY_PREFIX = ".autoseg-tmp-"
_TEMPORARY_NAME = re.compile(re.escape(TEMPORARY_PREFIX) + r"([A-Za-z0-9]*)\.(\d+)-")
# A temporary of another machine sharing the folder is stale only when this long untouched:
# its writer's process cannot be looked up from here.
FOREIGN_STALE_AFTER_SECONDS = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24]


def _writer_tag() -> str:
    return f"{TEMPORARY_PREFIX}{_host()}.{os.getpid()}-"


def temporary_sibling(path: str | Path) -> tuple[int, Path]:
    """An open file descriptor and the name of a new temporary file beside ``path``. The name
    ends with ``path``'s own name, so writers that pick a format by the ending (SimpleITK) work."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_writer_tag(), suffix=f"-{path.name}", dir=path.parent)
    return fd, Path(tmp)


def temporary_folder_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{_writer_tag()}{path.name}")


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(folder: str | Path, depth: int = 2) -> list[Path]:
    """Remove the temporaries that killed autoseg processes left in ``folder`` and its
    subfolders down to ``depth`` levels: those written on this machine by a process that no
    longer runs, and those of other machines untouched for ``FOREIGN_STALE_AFTER_SECONDS``.
    Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None:
            if depth > 1 and entry.is_dir(follow_symlinks=False):
                removed += remove_stale_temporaries(entry.path, depth - 1)
            continue
        try:
            if _is_stale(entry, host=match.group(1), pid=int(match.group(2))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove: leave it
    return removed


def _is_stale(entry: os.DirEntry, host: str, pid: int) -> bool:
    if host == _host():
        return not _process_is_alive(pid)
    return time.time() - entry.stat(follow_symlinks=False).st_mtime >= FOREIGN_STALE_AFTER_SECONDS


def give_usual_permissions(path: str | Path) -> None:
    """0666 less the umask, as ``open`` would: mkstemp makes its files 0600, readable by their owner only."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the final name never holds a partial file.

    A failed write (disk full, permission denied) leaves neither the final name nor the
    temporary file behind, and its ``OSError`` names ``path`` (a bare write error names none).
    """
    atomic_write_with(path, lambda handle: handle.write(data))


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """As ``atomic_write_bytes``, with ``write(handle)`` writing the content: a large array goes to the
    file without a copy of it in memory first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_sibling(path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, exc.filename or str(path.parent)) from None
    try:
        give_usual_permissions(tmp)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def copy_file_atomic(source: str | Path, target: str | Path) -> None:
    """``shutil.copyfile``, but a crash or a full disk never leaves a truncated ``target``."""
    atomic_write_bytes(target, Path(source).read_bytes())


def check_writable_folder(folder: str | Path) -> None:
    """Create ``folder`` if needed and write (and delete) a file in it, so a command that cannot
    write its output says so before it starts long work, not after. Temporaries that a killed
    run left there are removed on the way (see ``remove_stale_temporaries``)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".autoseg-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output folder is not writable ({exc.strerror or exc})", folder) from None
    remove_stale_temporaries(folder)


def to_jsonable(value: Any) -> Any:
    """Turn dataclasses, tuples, paths and numpy scalars into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if isinstance(value, float):
        # Rounded so that tiny platform differences in the last bits do not change files.
        return float(f"{value:.10g}")
    return value


def dumps(record: Any) -> str:
    return json.dumps(to_jsonable(record), indent=2, sort_keys=True, allow_nan=False) + "\n"


def save_json(record: Any, path: str | Path) -> None:
    atomic_write_bytes(path, dumps(record).encode("utf-8"))


def read_json(path: str | Path, error: type[AutosegError] = AutosegError) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error("file does not exist", path) from None
    except IsADirectoryError:
        raise error("is a directory, expected a JSON file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot be read ({exc.__class__.__name__}: {exc})", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path) from None


def from_jsonable(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from parsed JSON, checking names and basic types."""
    return _convert(cls, data, where or cls.__name__)


def _convert(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, data, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(errors[0] if errors else f"{where}: unexpected null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise TypeError(f"{where}: unknown field(s) {unknown}")
        kwargs = {}
        for name, field in fields.items():
            if name in data:
                kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise TypeError(f"{where}: missing field '{name}'")
        return tp(**kwargs)
    if origin in (list, tuple):
        if not isinstance(data, list):
            raise TypeError(f"{where}: expected a list, got {type(data).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(_convert(a, d, f"{where}[{i}]") for i, (a, d) in enumerate(zip(args, data)))
        inner = args[0] if args else Any
        items = [_convert(inner, d, f"{where}[{i}]") for i, d in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected an object, got {type(data).__name__}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _convert(inner, v, f"{where}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise TypeError(f"{where}: expected a number, got {data!r}")
        return float(data)
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"{where}: expected an integer, got {data!r}")
        return data
    if tp is str:
        if not isinstance(data, str):
            raise TypeError(f"{where}: expected a string, got {data!r}")
        return data
    if tp is bool:
        if not isinstance(data, bool):
            raise TypeError(f"{where}: expected true or false, got {data!r}")
        return data
    return data


def load_record(cls: type[T], path: str | Path, error: type[AutosegError], schema_version: int | None = None) -> T:
    """Read ``path`` and build ``cls``; any problem becomes ``error`` naming the file."""
    data = read_json(path, error)
    if schema_version is not None:
        found = data.get("schema_version") if isinstance(data, dict) else None
        if found != schema_version:
            raise error(f"schema_version is {found!r}, this autoseg reads version {schema_version}; "
                        "re-run the stage that wrote it", path)
    try:
        return from_jsonable(cls, data)
    except TypeError as exc:
        raise error(f"does not match the {cls.__name__} schema: {exc}", path) from None
