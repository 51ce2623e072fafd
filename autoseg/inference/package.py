"""Reading a model package (``autoseg export``): verify every member, unpack, load the models.

A package is a zip or the folder it unpacks to. Before anything in it is loaded, every
member listed in ``model.json`` is checked against its size and sha256 there; a zip is
refused whole when a member's name would land outside the target folder (absolute, ``..``),
is a symbolic link, is not listed in the manifest, or looks like a zip bomb (a compression
ratio no model file has, or more bytes than the manifest says, counted while unpacking
rather than trusted from the zip header). Weights load with ``weights_only=True``, so a
package that passes every check still cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch

from autoseg.errors import AutosegError, CheckpointError, PackageError, PlanError
from autoseg.records import from_jsonable

PACKAGE_SCHEMA_VERSION = 1
MANIFEST = "model.json"
MAX_MANIFEST_BYTES = 1 << 20
# Checkpoints compress about 1.1:1 and ONNX files about as much; JSON files are small. A large
# member compressed much better than this is not a model file.
MAX_COMPRESSION_RATIO = 100
RATIO_CHECKED_ABOVE_BYTES = 1 << 20
MAX_PACKAGE_BYTES = int(os.environ.get("AUTOSEG_MAX_PACKAGE_BYTES", 20 * 2**30))
_CHUNK = 1 << 20


@dataclass
class PackagedFile:
    size: int
    sha256: str


@dataclass
class PackagedModel:
    configuration: str
    architecture: str
    folds: list[str]
    checkpoints: dict[str, str]  # fold -> checkpoint file it holds (checkpoint_final.pt or checkpoint_best.pt)
    cross_validation: dict[str, dict[str, Any]]  # class -> mean dice, hd95 over the folds' validation cases, cases
    training: dict[str, dict[str, Any]]  # fold -> epoch, scheduler, plan, seed of its checkpoint


@dataclass
class ModelManifest:
    schema_version: int
    dataset: str
    labels: dict[str, Any]
    models: list[PackagedModel]  # several: an ensemble, averaged as `autoseg predict -c A B` averages it
    postprocessing: bool  # postprocessing.json is in the package
    onnx_opset: int | None  # the ONNX networks' opset, when exported with --onnx
    autoseg_version: str
    torch_version: str
    created: str  # UTC, ISO 8601
    files: dict[str, PackagedFile] = field(default_factory=dict)  # every other member: size and sha256


def member_folder(configuration: str, architecture: str) -> str:
    return f"models/{configuration}__{architecture}"


def is_package(path: str | Path) -> bool:
    path = Path(path)
    return zipfile.is_zipfile(path) if path.is_file() else (path / MANIFEST).is_file()


@contextlib.contextmanager
def opened_package(path: str | Path) -> Iterator[tuple[Path, ModelManifest]]:
    """The verified package as a folder and its manifest; a zip is unpacked into a temporary
    folder that is removed on leaving the block (load what you need inside it)."""
    path = Path(path)
    if path.is_dir():
        manifest = _parse_manifest(path / MANIFEST, path)
        _verify_folder(path, manifest)
        yield path, manifest
        return
    if not path.is_file():
        raise PackageError("model package does not exist", path)
    temporary = Path(tempfile.mkdtemp(prefix="autoseg-package-"))
    try:
        manifest = _unpack_zip(path, temporary)
        yield temporary, manifest
    except AutosegError as exc:  # a member that loads badly is named inside the package, not the temporary copy
        if exc.path is None or not exc.path.startswith(str(temporary)):
            raise
        member = Path(exc.path).relative_to(temporary).as_posix()
        raise type(exc)(exc.problem if member == "." else f"member '{member}': {exc.problem}", path) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _safe_name(name: str, package: Path) -> str:
    pure = PurePosixPath(name)
    if (not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]
            or name.startswith("/")):
        raise PackageError(f"member '{name}' would be written outside the package folder; refused", package)
    return name


def _parse_manifest(source: Path | bytes, package: Path) -> ModelManifest:
    import json

    if isinstance(source, Path):
        if not source.is_file() or source.is_symlink():
            raise PackageError(f"member '{MANIFEST}' is missing (not an autoseg model package)", package)
        if source.stat().st_size > MAX_MANIFEST_BYTES:
            raise PackageError(f"member '{MANIFEST}' is larger than {MAX_MANIFEST_BYTES} bytes; refused", package)
        source = source.read_bytes()
    try:
        data = json.loads(source.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"member '{MANIFEST}' is not valid JSON ({exc})", package) from None
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != PACKAGE_SCHEMA_VERSION:
        raise PackageError(f"member '{MANIFEST}': schema_version is {found!r}, this autoseg reads "
                           f"{PACKAGE_SCHEMA_VERSION}", package)
    try:
        manifest = from_jsonable(ModelManifest, data)
    except TypeError as exc:
        raise PackageError(f"member '{MANIFEST}' does not match the manifest schema: {exc}", package) from None
    for name in manifest.files:
        _safe_name(name, package)
    # The names that become paths when the models load: plain words only, so that a manifest cannot send
    # the loader to plans or weights outside the verified members ("../../elsewhere").
    for model in manifest.models:
        names = [model.configuration, model.architecture, *model.folds, *model.checkpoints.values()]
        unsafe = [name for name in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name]
        if unsafe:
            raise PackageError(f"member '{MANIFEST}': {unsafe[0]!r} is not a plain name (configuration, "
                               "architecture, fold or checkpoint); refused", package)
    return manifest


def _verify_folder(folder: Path, manifest: ModelManifest) -> None:
    root = folder.resolve()
    # As in a zip: a file the manifest does not list was never verified, and the loader might prefer it
    # (a stray fold-level plans.json, or checkpoint_final.pt beside a packaged checkpoint_best.pt).
    # Hidden files (a file browser's .DS_Store) are no name the loader reads.
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*")
               if not path.is_dir() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}
    unlisted = sorted(present - set(manifest.files) - {MANIFEST})
    if unlisted:
        raise PackageError(f"member '{unlisted[0]}' is not listed in model.json; refused", folder)
    for name, expected in manifest.files.items():
        path = folder / name
        for parent in [path, *path.parents]:
            if parent == folder:
                break
            if parent.is_symlink():
                raise PackageError(f"member '{name}' is (inside) a symbolic link; refused", folder)
        if not path.is_file():
            raise PackageError(f"member '{name}' is missing", folder)
        if root not in path.resolve().parents:
            raise PackageError(f"member '{name}' lies outside the package folder; refused", folder)
        if path.stat().st_size != expected.size:
            raise PackageError(f"member '{name}' has {path.stat().st_size} bytes, model.json says {expected.size} "
                               "(tampered or corrupt)", folder)
        with open(path, "rb") as handle:
            digest = _copy_hashing(handle, None, expected.size + 1)
        _check_digest(name, digest, expected, folder)


# What reading a member of a damaged or unusual zip raises: a bad CRC or truncation (BadZipFile, EOFError),
# damaged deflate data (zlib.error), an encrypted member (RuntimeError) or an unsupported compression method
# (NotImplementedError); each is the package's fault, not autoseg's, and is reported as such.
UNREADABLE_MEMBER = (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError)


def _unpack_zip(package: Path, target: Path) -> ModelManifest:
    try:
        archive = zipfile.ZipFile(package)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(f"not a model package zip ({exc})", package) from None
    with archive:
        infos = {}
        for info in archive.infolist():
            name = _safe_name(info.filename, package)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PackageError(f"member '{name}' is a symbolic link; refused", package)
            if not info.is_dir():
                infos[name] = info
        if MANIFEST not in infos:
            raise PackageError(f"member '{MANIFEST}' is missing (not an autoseg model package)", package)
        if infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
            raise PackageError(f"member '{MANIFEST}' is larger than {MAX_MANIFEST_BYTES} bytes; refused", package)
        try:
            with archive.open(infos[MANIFEST]) as handle:
                manifest_bytes = handle.read(MAX_MANIFEST_BYTES + 1)
        except UNREADABLE_MEMBER as exc:
            raise PackageError(f"member '{MANIFEST}' cannot be unpacked ({exc})", package) from None
        manifest = _parse_manifest(manifest_bytes, package)
        unlisted = sorted(set(infos) - set(manifest.files) - {MANIFEST})
        if unlisted:
            raise PackageError(f"member '{unlisted[0]}' is not listed in model.json; refused", package)
        total = sum(f.size for f in manifest.files.values())
        if total > MAX_PACKAGE_BYTES:
            raise PackageError(f"model.json lists {total} bytes, more than the limit of {MAX_PACKAGE_BYTES} "
                               "(AUTOSEG_MAX_PACKAGE_BYTES); refused", package)
        for name, expected in manifest.files.items():
            info = infos.get(name)
            if info is None:
                raise PackageError(f"member '{name}' is missing", package)
            if info.file_size > RATIO_CHECKED_ABOVE_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(
                    1, info.compress_size):
                raise PackageError(f"member '{name}' expands {info.file_size // max(1, info.compress_size)}:1, "
                                   "refused as a possible zip bomb", package)
            if info.file_size != expected.size:
                raise PackageError(f"member '{name}' has {info.file_size} bytes, model.json says {expected.size} "
                                   "(tampered or corrupt)", package)
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(destination, "xb") as sink:
                    digest = _copy_hashing(source, sink, expected.size + 1)
            except UNREADABLE_MEMBER as exc:
                raise PackageError(f"member '{name}' cannot be unpacked ({exc})", package) from None
            if destination.stat().st_size > expected.size:  # the zip header lied about the size
                raise PackageError(f"member '{name}' unpacks to more than the {expected.size} bytes model.json "
                                   "says; refused as a possible zip bomb", package)
            _check_digest(name, digest, expected, package)
    return manifest


def _copy_hashing(source, sink, limit: int) -> str:
    """sha256 of at most ``limit`` bytes of ``source``, copied to ``sink`` when given."""
    digest, copied = hashlib.sha256(), 0
    while copied < limit:
        chunk = source.read(min(_CHUNK, limit - copied))
        if not chunk:
            break
        digest.update(chunk)
        copied += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def _check_digest(name: str, digest: str, expected: PackagedFile, package: Path) -> None:
    if digest != expected.sha256:
        raise PackageError(f"member '{name}' does not match its sha256 in model.json (tampered or corrupt)", package)


def load_package_models(folder: Path, manifest: ModelManifest, device: torch.device, folds: list[str] | None = None,
                        engine: str = "torch"):
    """The trained models of a verified package folder (``opened_package``), and its postprocessing."""
    from autoseg.errors import UsageError
    from autoseg.inference.model import load_trained_model
    from autoseg.inference.postprocessing import load_postprocessing

    models = []
    for packaged in manifest.models:
        chosen = folds or packaged.folds
        unknown = [f for f in chosen if f not in packaged.folds]
        if unknown:
            raise UsageError(f"fold(s) {' '.join(unknown)} are not in the package (it holds "
                             f"{' '.join(packaged.folds)})", folder)
        model_dir = folder / member_folder(packaged.configuration, packaged.architecture)
        try:
            if engine == "onnxruntime":
                from autoseg.inference.onnx import load_onnx_model

                models.append(load_onnx_model(model_dir, chosen, packaged.configuration, packaged.architecture))
            else:
                models.append(load_trained_model(model_dir, chosen, packaged.configuration, packaged.architecture,
                                                 device, checkpoint_name=packaged.checkpoints))
        except (PlanError, CheckpointError) as exc:
            raise type(exc)(exc.problem + _made_by_another_version(manifest), exc.path) from exc
    return models, (load_postprocessing(folder) if manifest.postprocessing else None)


def _made_by_another_version(manifest: ModelManifest) -> str:
    """The versions that made the package, when they differ from these: a plan or checkpoint that does not
    load was most likely written by a newer autoseg (a field this one does not know), which the error alone
    does not say."""
    from autoseg import __version__

    if manifest.autoseg_version == __version__ and manifest.torch_version == torch.__version__:
        return ""
    return (f" (the package was made by autoseg {manifest.autoseg_version} with torch {manifest.torch_version}; "
            f"this is autoseg {__version__} with torch {torch.__version__}: install the version that made it)")
