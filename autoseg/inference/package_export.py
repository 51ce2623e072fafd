"""``autoseg export``: one zip that holds everything a trained model (or ensemble) needs to predict.

Layout of the package (every member listed with its size and sha256 in ``model.json``)::

    model.json                               the manifest (``ModelManifest``)
    dataset.json                             labels, channels, file ending
    postprocessing.json                      the decision of the cross-validation, when one was made
    models/CONFIG__ARCH/plans.json           the plan each member was trained with
    models/CONFIG__ARCH/fold_N/checkpoint_final.pt   network weights only ({"model": state dict})
    models/CONFIG__ARCH/fold_N/network.onnx  with --onnx (unet, resenc_unet)

Checkpoints are stripped to their weights (optimiser state, RNG states and history stay
behind: a package is for prediction, and it halves the size). The zip is written under a
temporary name and renamed, with fixed member dates, so the same model exports to the
same bytes apart from the manifest's date.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg import __version__
from autoseg.errors import UsageError
from autoseg.evaluation.evaluate import summarize_rows
from autoseg.inference.ensemble import ensemble_folder, model_name
from autoseg.inference.model import check_fold_plan, find_checkpoint, load_checkpoint_content, weights_of
from autoseg.inference.package import (MANIFEST, PACKAGE_SCHEMA_VERSION, ModelManifest, PackagedFile, PackagedModel,
                                       member_folder)
from autoseg.inference.postprocessing import POSTPROCESSING_FILE
from autoseg.inference.predictor import same_outputs
from autoseg.paths import Roots
from autoseg.planning.plans import load_plans
from autoseg.records import atomic_write_with, dumps, read_json

_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed member dates: the same model gives the same members
CHECKPOINT_NAMES = {"final": "checkpoint_final.pt", "best": "checkpoint_best.pt"}


def export_package(roots: Roots, dataset_name: str, models: list[tuple[str, str]], folds: list[str], output: Path,
                   checkpoint: str | None = None, onnx: bool = False) -> ModelManifest:
    """Write the package of ``models`` ((configuration, architecture) pairs, several: an ensemble) to ``output``."""
    output = Path(output)
    if output.suffix.lower() != ".zip":
        raise UsageError("the package is a zip file: give -o NAME.zip", output)
    twice = sorted({f for f in folds if list(folds).count(f) > 1})
    if twice:
        raise UsageError(f"fold(s) {' '.join(twice)} given twice (each would count twice in the ensemble)")
    members: dict[str, bytes] = {}
    packaged = []
    dataset_json, first_plans = None, None
    for configuration, architecture in models:
        model_dir = roots.results / dataset_name / model_name(configuration, architecture)
        if not model_dir.is_dir():
            raise UsageError(f"no trained model {model_name(configuration, architecture)} (train it first)", model_dir)
        folder = member_folder(configuration, architecture)
        plans_file = next((p for p in [model_dir / f"fold_{f}" / "plans.json" for f in folds] + [model_dir / "plans.json"]
                           if p.is_file()), None)
        if plans_file is None:
            raise UsageError("no plans.json beside the trained model", model_dir)
        members[f"{folder}/plans.json"] = plans_file.read_bytes()
        plans = load_plans(plans_file)
        first_plans = first_plans or plans
        if not same_outputs(plans, first_plans):  # refused now, not by every user who loads the package
            raise UsageError(f"{model_dir.name} differs from {model_name(*models[0])} in labels or channels: "
                             "ensemble models of one dataset and plan only", plans_file)
        dataset_json = dataset_json or next((p for p in (model_dir / "dataset.json", roots.raw_dataset(dataset_name)
                                                         / "dataset.json") if p.is_file()), None)
        chosen, training = {}, {}
        for fold in folds:
            fold_dir = model_dir / f"fold_{fold}"
            if not fold_dir.is_dir():
                raise UsageError(f"fold {fold} of {model_dir.name} is not trained", fold_dir)
            path = find_checkpoint(fold_dir, CHECKPOINT_NAMES[checkpoint] if checkpoint else None)
            content = load_checkpoint_content(path)  # once: the weights and the training settings come from it
            settings = _training_settings(content)
            check_fold_plan(settings.get("plan"), plans, configuration, architecture, path)
            members[f"{folder}/fold_{fold}/{path.name}"] = _weights_only(content, path)
            del content
            chosen[fold], training[fold] = path.name, settings
        if onnx:
            from autoseg.inference.onnx import export_onnx_members

            members.update(export_onnx_members(members, folder, configuration, architecture, folds))
        packaged.append(PackagedModel(configuration, architecture, list(folds), chosen,
                                      _cross_validation(model_dir, folds), training))
    if dataset_json is None:
        raise UsageError("no dataset.json beside the model or in the raw dataset", roots.results / dataset_name)
    members["dataset.json"] = dataset_json.read_bytes()
    names = [model_name(c, a) for c, a in models]
    decision_folder = (roots.results / dataset_name / names[0] if len(models) == 1
                       else ensemble_folder(roots, dataset_name, names))
    if (decision_folder / POSTPROCESSING_FILE).is_file():
        members[POSTPROCESSING_FILE] = (decision_folder / POSTPROCESSING_FILE).read_bytes()
    manifest = ModelManifest(
        schema_version=PACKAGE_SCHEMA_VERSION, dataset=dataset_name, labels=first_plans.labels,  # what it predicts
        models=packaged, postprocessing=POSTPROCESSING_FILE in members,
        onnx_opset=_onnx_opset() if onnx else None, autoseg_version=__version__, torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        files={name: PackagedFile(len(data), hashlib.sha256(data).hexdigest()) for name, data in sorted(members.items())})
    _write_zip(output, {MANIFEST: dumps(manifest).encode("utf-8"), **members})
    return manifest


def _weights_only(content, checkpoint: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": weights_of(content, checkpoint)}, buffer)
    return buffer.getvalue()


def _training_settings(content) -> dict[str, Any]:
    """What the fold was trained with, from its checkpoint's content (plan, schedule, epochs)."""
    if not isinstance(content, dict):
        return {}
    settings = {key: content[key] for key in ("epoch", "scheduler", "plan", "seed") if key in content}
    return _plain(settings)


def _plain(value: Any) -> Any:
    """JSON values only (tensors and other objects of a checkpoint are left out)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if _plain(v) is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    return None


def _cross_validation(model_dir: Path, folds: list[str]) -> dict[str, dict[str, float | None]]:
    """Per class: mean Dice and HD95 over the validation cases of ``folds`` (from their summary.json)."""
    rows = []
    for fold in folds:
        summary = model_dir / f"fold_{fold}" / "validation" / "summary.json"
        if summary.is_file():
            rows += read_json(summary).get("per_case", [])
    classes = sorted({key.rsplit("/", 1)[0] for row in rows for key in row if "/" in key})
    per_class, _ = summarize_rows(rows, classes)  # evaluate's own per-class means
    return {name: {"dice": summary.mean["dice"], "hd95": summary.mean["hd95"], "cases": len(rows)}
            for name, summary in per_class.items()}


def _onnx_opset() -> int:
    from autoseg.inference.onnx import OPSET

    return OPSET


def _write_zip(output: Path, members: dict[str, bytes]) -> None:
    """The zip written straight into the temporary file that becomes ``output`` (atomically, like every other
    output): built in memory first, it held two more copies of the members (five folds of a large network
    are gigabytes)."""
    def write(handle) -> None:
        with zipfile.ZipFile(handle, "w") as archive:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, data, compresslevel=1)

    atomic_write_with(output, write)
