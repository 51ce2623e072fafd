"""ONNX export of the CNN networks and an onnxruntime engine for the same sliding window.

``autoseg export --onnx`` adds ``network.onnx`` beside each fold's weights. The network is
exported in eval mode (full-resolution logits only) at the plan's patch, which is fixed, with
only the batch axis dynamic: the sliding window sends windows x mirror flips in one call.
The TorchScript exporter (``dynamo=False``) is used because it needs nothing beyond torch
and ``onnx``; the dynamo exporter would add ``onnxscript``.

``predict --engine onnxruntime`` (and ``Segmenter.load(..., engine="onnxruntime")``) wraps
each fold's ONNX session as a callable that the sliding window uses in place of the torch
network, so windows, weights, mirroring and everything after are the same code.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from autoseg.errors import UsageError

OPSET = 17
ONNX_ARCHITECTURES = ("unet", "resenc_unet")
ONNX_FILE = "network.onnx"
_MISSING = "ONNX needs the onnx extra: pip install 'autoseg[onnx]' (onnx and onnxruntime, CPU only)"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(_MISSING) from None


def export_onnx_members(members: dict[str, bytes], folder: str, configuration: str, architecture: str,
                        folds: list[str]) -> dict[str, bytes]:
    """``{folder}/fold_N/network.onnx`` for each fold, from the weights and plan already in ``members``."""
    from autoseg.inference.model import load_state_dict
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans

    if architecture not in ONNX_ARCHITECTURES:
        raise UsageError(f"architecture '{architecture}' does not export to ONNX (only {', '.join(ONNX_ARCHITECTURES)}:"
                         " its Mamba/LSTM scans or window attention are not traced); export it without --onnx")
    _require("onnx")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="autoseg-onnx-") as temporary:
        plans_file = Path(temporary) / "plans.json"
        plans_file.write_bytes(members[f"{folder}/plans.json"])
        plans = load_plans(plans_file)
        config = plans.configuration(configuration)
        arch = plans.architecture(configuration, architecture)
        exported = {}
        for fold in folds:
            name = next(n for n in members if n.startswith(f"{folder}/fold_{fold}/checkpoint_"))
            weights = Path(temporary) / f"fold_{fold}.pt"
            weights.write_bytes(members[name])
            network = build_network(arch, plans.num_input_channels, plans.num_segmentation_heads, config.dimensions,
                                    deep_supervision=True)
            network.load_state_dict(load_state_dict(weights))
            example = torch.zeros((1, plans.num_input_channels, *arch.patch_size))
            exported[f"{folder}/fold_{fold}/{ONNX_FILE}"] = network_to_onnx(network.eval(), example)
    return exported


def network_to_onnx(network: torch.nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(network, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


class OnnxNetwork:
    """An onnxruntime session that the sliding window calls like a torch network (float32 on the CPU)."""

    def __init__(self, path: Path, threads: int | None = None):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {"image": image.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(image.device)


def load_onnx_model(model_dir: Path, folds: list[str], configuration: str, architecture: str):
    """The ``TrainedModel`` of a package member whose folds hold ``network.onnx``."""
    from autoseg.inference.model import TrainedModel, model_plans

    missing = [f for f in folds if not (model_dir / f"fold_{f}" / ONNX_FILE).is_file()]
    if missing:
        raise UsageError(f"no {ONNX_FILE} for fold(s) {' '.join(missing)}: export the package with --onnx", model_dir)
    plans = model_plans(model_dir, [], None)
    networks = [OnnxNetwork(model_dir / f"fold_{f}" / ONNX_FILE) for f in folds]
    return TrainedModel(plans, configuration, architecture, networks, list(folds))
