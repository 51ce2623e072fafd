"""``autoseg.Segmenter``: load a trained model once, segment many images from Python.

Example (run by ``tests/test_api.py``)::

    import SimpleITK as sitk
    from autoseg import Segmenter

    seg = Segmenter.load("hippocampus.zip", device="cpu")  # a package, or a results model folder
    mask = seg.predict(sitk.ReadImage("scan.nii.gz"))        # a SimpleITK image in, a SimpleITK image out
    probs = seg.predict_probabilities(sitk_image)            # (K, Z, Y, X), channel k is seg.label_values[k]

``predict`` takes a SimpleITK image, a nibabel image, a path (or a list of them, one per
channel) or a numpy array with ``spacing``, and returns the same kind of thing (a path
gives a SimpleITK image) with the input's geometry. Its voxels are exactly what
``autoseg predict`` writes for the same image: the same preprocessing, sliding window,
ensemble, postprocessing and output type, through the same functions.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from autoseg.errors import AutosegError, UsageError
from autoseg.inference.model import TrainedModel
from autoseg.inference.postprocessing import PostprocessingDecision, apply_postprocessing
from autoseg.inference.predictor import PredictionSettings, predict_case
from autoseg.io.images import Geometry, intensity_problem, read_image


class Segmenter:
    """A trained model (or ensemble) held in memory, ready to predict one image after another.

    Build it with ``Segmenter.load``. ``label_values`` gives the label of each probability channel."""

    def __init__(self, models: list[TrainedModel], postprocessing: PostprocessingDecision | None,
                 device: torch.device, settings: PredictionSettings):
        self.models, self.postprocessing, self.device, self.settings = models, postprocessing, device, settings
        plans = models[0].plans
        from autoseg.preprocessing.preprocess import class_values

        self.label_values: list[int] = list(plans.regions_class_order if plans.has_regions else class_values(plans))
        self.num_channels: int = plans.num_input_channels

    @classmethod
    def load(cls, source: str | Path, device: str = "cpu", threads: int | None = None, tta: bool = True,
             step: float = 0.5, fp32: bool = False, folds: Sequence[str | int] | None = None,
             engine: str = "torch", postprocessing: bool = True) -> "Segmenter":
        """Load ``source``: a package from ``autoseg export`` (zip or unpacked folder), verified first,
        or a trained model's results folder (``AUTOSEG_RESULTS/DatasetNNN_Name/CONFIG__ARCH``).

        ``device``: "cpu", "cuda", "mps" or "auto"; ``threads``: torch CPU threads (default: torch's);
        ``tta``: mirroring; ``step``: window step as a fraction of the patch; ``fp32``: no bf16 autocast;
        ``folds``: a subset of the trained folds; ``engine``: "torch" or "onnxruntime" (packages
        exported with ``--onnx``); ``postprocessing``: apply the cross-validation's decision."""
        from autoseg.commands.predict import select_device
        from autoseg.inference.package import is_package, load_package_models, opened_package

        if not 0 < step <= 1:
            raise UsageError(f"step must be in (0, 1], got {step}")
        if engine not in ("torch", "onnxruntime"):  # a misspelt one ran torch without a word
            raise UsageError(f"engine must be 'torch' or 'onnxruntime', got {engine!r}")
        if folds is not None and not list(folds):  # a package took [] as every fold, a results folder as none
            raise UsageError("folds is empty: give the folds to use, or None for all of them")
        if threads is not None:
            torch.set_num_threads(int(threads))
        torch_device = select_device(device)
        chosen = [str(f) for f in folds] if folds is not None else None
        source = Path(source)
        if not source.exists():
            raise UsageError("does not exist (give a model package or a trained model folder)", source)
        if source.is_file() or is_package(source):  # a damaged zip is not a zip: its error says so, not "neither"
            with opened_package(source) as (folder, manifest):
                models, decision = load_package_models(folder, manifest, torch_device, chosen, engine)
        elif engine != "torch":
            raise UsageError("engine 'onnxruntime' needs a package exported with --onnx", source)
        else:
            from autoseg.inference.postprocessing import load_postprocessing

            models, decision = [_load_results_folder(source, torch_device, chosen)], load_postprocessing(source)
        settings = PredictionSettings(step=step, mirror=tta, amp=not fp32 and engine == "torch")
        return cls(models, decision if postprocessing else None, torch_device, settings)

    def predict(self, image: Any, spacing: Sequence[float] | None = None, origin: Sequence[float] | None = None,
                direction: Sequence[float] | None = None):
        """The label map of ``image``, as the same kind of object with the same geometry."""
        array, geometry, kind, reference = self._read(image, spacing, origin, direction)
        prediction = predict_case(self._model(), array, geometry, self.settings, self.device)
        labels = apply_postprocessing(prediction.labels, self.postprocessing)
        return _as_input_kind(labels, geometry, kind, reference, max(self.label_values))

    def predict_probabilities(self, image: Any, spacing: Sequence[float] | None = None,
                              origin: Sequence[float] | None = None,
                              direction: Sequence[float] | None = None) -> np.ndarray:
        """Probabilities ``(K, *image array shape)`` float16 on the image's grid (what ``--save-probabilities``
        writes); channel k belongs to ``label_values[k]``. No postprocessing."""
        array, geometry, _, _ = self._read(image, spacing, origin, direction)
        settings = PredictionSettings(**{**vars(self.settings), "save_probabilities": True})
        probabilities = predict_case(self._model(), array, geometry, settings, self.device).probabilities
        return probabilities.reshape((probabilities.shape[0], *geometry.shape))

    def _model(self):
        return self.models[0] if len(self.models) == 1 else self.models

    def _read(self, image, spacing, origin, direction):
        array, geometry, kind, reference = _to_array(image, spacing, origin, direction)
        if array.shape[0] != self.num_channels:
            raise UsageError(f"the image has {array.shape[0]} channel(s), the model expects {self.num_channels}")
        problem = intensity_problem(array)
        if problem:
            raise AutosegError(problem, reference if isinstance(reference, (str, Path)) else None)
        return array, geometry, kind, reference


def _load_results_folder(model_dir: Path, device: torch.device, folds: list[str] | None) -> TrainedModel:
    from autoseg.inference.ensemble import split_model_name
    from autoseg.inference.model import FINAL_CHECKPOINT, load_trained_model

    if not model_dir.is_dir() or "__" not in model_dir.name:
        raise UsageError("neither a model package (zip, or a folder with model.json) nor a trained model folder "
                         "(CONFIG__ARCH)", model_dir)
    configuration, architecture = split_model_name(model_dir.name)
    if folds is None:  # the finished folds, as nnU-Net finds them: a fold still training, fold_all (trained on
        # every case, so it would see the others' validation cases) and renamed copies (fold_0_old) are left out
        folds = sorted((p.name[len("fold_"):] for p in model_dir.glob("fold_*")
                        if re.fullmatch(r"fold_\d+", p.name) and (p / FINAL_CHECKPOINT).is_file()), key=int)
        if not folds:
            raise UsageError(f"no finished fold (fold_N/{FINAL_CHECKPOINT}) in the model folder", model_dir)
    return load_trained_model(model_dir, folds, configuration, architecture, device)


def _to_array(image, spacing, origin, direction) -> tuple[np.ndarray, Geometry, str, Any]:
    """(C, Z, Y, X) float32 pixels, geometry, the input's kind and what is needed to give it back."""
    import SimpleITK as sitk

    if isinstance(image, (str, Path)) or (isinstance(image, (list, tuple)) and image
                                         and isinstance(image[0], (str, Path))):
        paths = [Path(p) for p in ([image] if isinstance(image, (str, Path)) else image)]
        return _read_channel_files(paths) + ("path", paths[0])
    if isinstance(image, sitk.Image):
        return _read_sitk(image) + ("sitk", image)
    if type(image).__module__.startswith("nibabel"):
        # Through a file, exactly as `autoseg predict` reads and writes NIfTI (header kept).
        with tempfile.TemporaryDirectory(prefix="autoseg-api-") as folder:
            path = Path(folder) / "image.nii"
            image.to_filename(str(path))
            array, geometry = read_image(path)
        return array, geometry, "nibabel", image
    if isinstance(image, np.ndarray):
        if spacing is None:
            raise UsageError("a numpy array needs its spacing (per array axis, e.g. spacing=(z, y, x))")
        dimension = len(spacing)
        if image.ndim not in (dimension, dimension + 1) or dimension not in (2, 3):
            raise UsageError(f"array of shape {image.shape} does not fit {dimension} spacing values "
                             "(give (Z, Y, X) or (C, Z, Y, X) with 3 values, (Y, X) or (C, Y, X) with 2)")
        channels = image if image.ndim == dimension + 1 else image[None]
        try:  # a direction as np.eye(3) or nine numbers alike
            geometry = Geometry(shape=list(channels.shape[1:]), spacing=[float(s) for s in reversed(spacing)],
                                origin=[float(o) for o in np.ravel(origin if origin is not None else [0.0] * dimension)],
                                direction=[float(d) for d in np.ravel(direction if direction is not None
                                                                      else np.eye(dimension))])
        except (TypeError, ValueError):
            raise UsageError("spacing, origin and direction must be numbers") from None
        direction_matrix = np.reshape(geometry.direction, (dimension, dimension)) if len(
            geometry.direction) == dimension ** 2 else None
        if (not all(np.isfinite(geometry.spacing)) or min(geometry.spacing) <= 0 or len(geometry.origin) != dimension
                or not all(np.isfinite(geometry.origin)) or direction_matrix is None
                or not np.allclose(direction_matrix @ direction_matrix.T, np.eye(dimension), atol=1e-3)):
            raise UsageError("spacing must be positive and finite, origin have one finite value per axis and direction "
                             "be an orthonormal dimension x dimension matrix")
        array = np.ascontiguousarray(channels, dtype=np.float32).reshape((channels.shape[0], *geometry.array_shape))
        return array, geometry, "numpy", None
    raise UsageError(f"cannot segment a {type(image).__name__}: give a SimpleITK image, a nibabel image, a path "
                     "or a numpy array with spacing")


def _read_channel_files(paths: list[Path]) -> tuple[np.ndarray, Geometry]:
    arrays, geometry = [], None
    for path in paths:
        array, this = read_image(path)
        if geometry is not None and this.matches(geometry):
            raise AutosegError(f"geometry differs from {paths[0].name}: {'; '.join(this.matches(geometry))}", path)
        geometry = geometry or this
        arrays.append(array)
    return np.concatenate(arrays, axis=0), geometry


def _read_sitk(image) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise UsageError(f"a {dimension}D image: autoseg segments 2D and 3D images")
    array = sitk.GetArrayFromImage(image)
    array = array[None] if image.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array, -1, 0)
    geometry = Geometry(shape=list(reversed(image.GetSize())), spacing=list(image.GetSpacing()),
                        origin=list(image.GetOrigin()), direction=list(image.GetDirection()))
    return np.ascontiguousarray(array, dtype=np.float32).reshape((array.shape[0], *geometry.array_shape)), geometry


def _as_input_kind(labels: np.ndarray, geometry: Geometry, kind: str, reference: Any, largest_label: int):
    """The label map as the input's kind, with the dtype `autoseg predict` writes (``io.images.label_dtype``)."""
    import SimpleITK as sitk

    from autoseg.io.images import label_dtype

    labels = labels.reshape(geometry.shape)
    labels = labels.astype(label_dtype(max(int(labels.max(initial=0)), largest_label)))
    if kind == "numpy":
        return labels
    if kind == "nibabel":
        from autoseg.io.images import write_label

        import nibabel as nib

        with tempfile.TemporaryDirectory(prefix="autoseg-api-") as folder:
            source, target = Path(folder) / "image.nii", Path(folder) / "labels.nii"
            reference.to_filename(str(source))
            write_label(labels, target, geometry, reference_file=source, largest_label=largest_label)
            result = nib.load(str(target))
            return nib.Nifti1Image(np.asarray(result.dataobj), result.affine, result.header)
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image
