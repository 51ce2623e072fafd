"""Ensembles of trained models, and the class-probability files they are built from.

A model is named by its results folder, ``CONFIGURATION__ARCHITECTURE`` (``3d_fullres__unet``);
an ensemble by its members joined with ``+`` in sorted order
(``2d__unet+3d_fullres__unet``), and its records (``postprocessing.json``) live in
``AUTOSEG_RESULTS/DatasetNNN_Name/ensembles/<that name>/``.

Probability files (``CASE.npz``, written by ``--save-probabilities``) hold
``probabilities`` (``(K, Z, Y, X)`` float16 on the image's own grid) and ``label_values``
(the label value of each of the K channels).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, UsageError
from autoseg.paths import Roots
from autoseg.records import atomic_write_bytes


def model_name(configuration: str, architecture: str) -> str:
    return f"{configuration}__{architecture}"


def split_model_name(name: str) -> tuple[str, str]:
    configuration, separator, architecture = name.partition("__")
    if not separator or not configuration or not architecture:
        raise UsageError(f"'{name}' is not a model name CONFIGURATION__ARCHITECTURE (e.g. 3d_fullres__unet)")
    return configuration, architecture


def ensemble_name(members: list[str]) -> str:
    return "+".join(sorted(members))


def ensemble_folder(roots: Roots, dataset_name: str, members: list[str]) -> Path:
    return roots.results / dataset_name / "ensembles" / ensemble_name(members)


def save_probability_file(path: str | Path, probabilities: np.ndarray, label_values: list[int]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.astype(np.float16, copy=False),
                        label_values=np.asarray(label_values, dtype=np.int32))
    atomic_write_bytes(path, buffer.getvalue())


def load_probability_file(path: str | Path) -> tuple[np.ndarray, list[int]]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as content:
            return content["probabilities"], [int(v) for v in content["label_values"]]
    except FileNotFoundError:
        raise AutosegError("probability file does not exist", path) from None
    except (OSError, ValueError, KeyError) as exc:
        raise AutosegError(f"not an autoseg probability file ({exc.__class__.__name__}: {exc})", path) from None


def labels_from_probability_files(paths: list[Path]) -> np.ndarray:
    """The ensemble's label map: the argmax of the probabilities averaged over ``paths``."""
    total, values = None, None
    for path in paths:
        probabilities, these_values = load_probability_file(path)
        if total is None:
            total, values = probabilities.astype(np.float32), these_values
            continue
        if these_values != values or probabilities.shape != total.shape:
            raise AutosegError(f"does not fit {paths[0]} (label values {these_values} vs {values}, shape "
                               f"{list(probabilities.shape)} vs {list(total.shape)})", path)
        total += probabilities
    return np.asarray(values, dtype=np.int16)[total.argmax(0)]
