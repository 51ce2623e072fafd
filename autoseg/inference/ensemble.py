"""Ensembles of trained models, and the class-probability files they are built from.

A model is named by its results folder, ``CONFIGURATION__ARCHITECTURE`` (``3d_fullres__unet``);
an ensemble by its members joined with ``+`` in sorted order
(``2d__unet+3d_fullres__unet``), and its records (``postprocessing.json``) live in
``AUTOSEG_RESULTS/DatasetNNN_Name/ensembles/<that name>/``.

Probability files (``CASE.npz``, written by ``--save-probabilities``) hold
``probabilities`` (``(K, Z, Y, X)`` float16 on the image's own grid), ``label_values``
(the label value of each of the K channels) and ``regions``: true when the channels are
sigmoid probabilities of nnU-Net-style regions (each channel's value is what that region
writes, in ``regions_class_order``), false for softmax class probabilities. Files without
``regions`` are softmax.
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


def argmax_labels(probabilities: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Softmax outputs: each voxel takes the label value of its most probable channel."""
    return np.asarray(label_values, dtype=np.int16)[probabilities.argmax(0)]


def region_labels(probabilities: np.ndarray, regions_class_order: list[int]) -> np.ndarray:
    """Region outputs, as nnU-Net does: each region above 0.5 writes its value of
    ``regions_class_order``, in that order, so a nested region drawn later (say, enhancing
    tumour) overwrites the one containing it."""
    labels = np.zeros(probabilities.shape[1:], dtype=np.int16)
    for region_probability, value in zip(probabilities, regions_class_order):
        labels[region_probability > 0.5] = value
    return labels


def save_probability_file(path: str | Path, probabilities: np.ndarray, label_values: list[int],
                          regions: bool = False) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.astype(np.float16, copy=False),
                        label_values=np.asarray(label_values, dtype=np.int32), regions=np.asarray(regions))
    atomic_write_bytes(path, buffer.getvalue())


def load_probability_file(path: str | Path) -> tuple[np.ndarray, list[int], bool]:
    """(probabilities, label value of each channel, whether the channels are regions)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as content:
            regions = bool(content["regions"]) if "regions" in content.files else False
            return content["probabilities"], [int(v) for v in content["label_values"]], regions
    except FileNotFoundError:
        raise AutosegError("probability file does not exist", path) from None
    except (OSError, ValueError, KeyError) as exc:
        raise AutosegError(f"not an autoseg probability file ({exc.__class__.__name__}: {exc})", path) from None


def labels_from_probability_files(paths: list[Path]) -> np.ndarray:
    """The ensemble's label map from the probabilities averaged over ``paths``: their argmax,
    or for region outputs the regions above 0.5, as one model's prediction would be."""
    return labels_of(*mean_probabilities(paths))


def labels_of(probabilities: np.ndarray, values: list[int], regions: bool) -> np.ndarray:
    """Labels from (averaged) probabilities: argmax for classes, each region above 0.5 for regions."""
    return region_labels(probabilities, values) if regions else argmax_labels(probabilities, values)


def mean_probabilities(paths: list[Path]) -> tuple[np.ndarray, list[int], bool]:
    """The probabilities of ``paths`` averaged (float32), the label value of each channel, and whether the
    channels are regions; every file must have the same channels and shape."""
    total, values, regions = None, None, False
    for path in paths:
        probabilities, these_values, these_regions = load_probability_file(path)
        if total is None:
            total, values, regions = probabilities.astype(np.float32), these_values, these_regions
            continue
        if these_values != values or these_regions != regions or probabilities.shape != total.shape:
            kind = {False: "classes", True: "regions"}
            raise AutosegError(f"does not fit {paths[0]} (label values {these_values} vs {values}, "
                               f"{kind[these_regions]} vs {kind[regions]}, shape "
                               f"{list(probabilities.shape)} vs {list(total.shape)})", path)
        total += probabilities
    total /= len(paths)  # in place: a many-class CT's probabilities are gigabytes
    return total, values, regions
