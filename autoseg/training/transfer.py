"""``--pretrained``: start a network from another model's weights, tensor by tensor.

    from autoseg.training.transfer import transfer_weights

    report = transfer_weights(network, "results/.../checkpoint_final.pt", "unet")
    print(report.table())

The source is an autoseg training or pre-training checkpoint (its ``model``), a bare state
dict (an exported model), or an nnU-Net v2 ``checkpoint_final.pth`` (mapped by
``autoseg.training.nnunet_weights``). Every tensor whose name and shape match the target is
loaded; the rest keep their fresh initialisation (output heads for another label set, an
input stem for another number of channels). A transfer that loads less than half of the
encoder's weights (counted in elements, not tensors, so a 1x1 projection weighs less than a
3x3x3 convolution) is refused with the table: it is almost always the wrong checkpoint or
topology, and training from it would quietly be training from scratch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.errors import CheckpointError
from autoseg.records import save_json

MIN_ENCODER_FRACTION = 0.5
TABLE_NAME = "transfer"  # transfer.json and transfer.txt beside the fold

# Data types an nnU-Net checkpoint needs beyond tensors and containers: its logged history and
# ``_best_ema`` hold numpy float64 scalars. Plain data classes only; nothing that can run code.
_MULTIARRAY = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 renamed core to _core
NUMPY_ALLOWED = [(_MULTIARRAY.scalar, "numpy.core.multiarray.scalar"),
                 (_MULTIARRAY.scalar, "numpy._core.multiarray.scalar"), np.dtype,
                 # numpy >= 1.25 pickles a dtype by its class (np.dtypes.Float64DType ...); 1.24 has no np.dtypes
                 *(type(np.dtype(name)) for name in ("float64", "float32", "int64"))]


@dataclass
class TransferReport:
    """What a transfer did, per tensor name; saved as ``transfer.json`` (and the table as ``transfer.txt``)."""

    source: str
    source_format: str  # autoseg-checkpoint | autoseg-pretraining | state-dict | nnunet-v2:<class>
    architecture: str
    loaded: list[str] = field(default_factory=list)
    # name -> why it kept its fresh initialisation ("missing in source" or "shape A in source, B here")
    reinitialised: dict[str, str] = field(default_factory=dict)
    # source name -> why it was not used
    unused: dict[str, str] = field(default_factory=dict)
    encoder_elements_loaded: int = 0
    encoder_elements_total: int = 0
    encoder_tensors_loaded: int = 0
    encoder_tensors_total: int = 0

    @property
    def encoder_fraction(self) -> float:
        return self.encoder_elements_loaded / max(1, self.encoder_elements_total)

    def table(self, limit: int = 12) -> str:
        lines = [f"transfer from {self.source} ({self.source_format}) into {self.architecture}:",
                 f"  {'loaded':15s} {len(self.loaded):5d} tensors",
                 f"  {'re-initialised':15s} {len(self.reinitialised):5d} tensors",
                 f"  {'unused':15s} {len(self.unused):5d} tensors (in the source, not taken)",
                 f"  encoder: {self.encoder_tensors_loaded} of {self.encoder_tensors_total} tensors, "
                 f"{100 * self.encoder_fraction:.1f} % of its weights loaded"]
        for title, items in (("re-initialised", self.reinitialised), ("unused", self.unused)):
            for name, why in list(items.items())[:limit]:
                lines.append(f"  {title}: {name} ({why})")
            if len(items) > limit:
                lines.append(f"  {title}: ... {len(items) - limit} more in {TABLE_NAME}.json")
        return "\n".join(lines)

    def save(self, folder: Path) -> None:
        save_json(self, Path(folder) / f"{TABLE_NAME}.json")
        from autoseg.records import atomic_write_bytes

        atomic_write_bytes(Path(folder) / f"{TABLE_NAME}.txt", (self.table(limit=10**9) + "\n").encode())


def read_source_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """(network weights under autoseg's names, the source's format, source tensors dropped on the way and why).

    Nothing is unpickled but tensors, containers and numpy scalars."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("--pretrained checkpoint does not exist", path)
    try:
        with torch.serialization.safe_globals(NUMPY_ALLOWED):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and weights-only errors all mean "not plain tensors"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"not a checkpoint of plain tensors; refused without running it "
                              f"({exc.__class__.__name__}: {first})", path) from None
    from autoseg.training.nnunet_weights import is_nnunet_checkpoint, nnunet_state_dict

    if is_nnunet_checkpoint(content):
        state, class_name, dropped = nnunet_state_dict(content, path)
        return state, f"nnunet-v2:{class_name}", dropped
    dropped: dict[str, str] = {}
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        kind = "autoseg-pretraining" if content.get("format") == "autoseg-pretraining" else "autoseg-checkpoint"
        state = dict(content["model"])
        # A pre-training head (reconstruction) is no segmentation head, even where the shapes agree.
        for name in content.get("pretrain_head_names") or []:
            if state.pop(name, None) is not None:
                dropped[name] = "pre-training head"
    else:
        kind, state = "state-dict", content
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError("holds no state dict of network weights (a dict of name -> tensor, or one "
                              "under 'model')", path)
    return state, kind, dropped


def encoder_names(network: nn.Module, architecture: str) -> set[str]:
    from autoseg.networks.registry import ARCHITECTURES

    prefixes = ARCHITECTURES[architecture].encoder_prefixes
    return {name for name in _canonical_tensors(network) if name.startswith(prefixes)}


def transfer_weights(network: nn.Module, source: str | Path, architecture: str, allow_partial: bool = False,
                     print_table: bool = True) -> TransferReport:
    """Load every matching tensor of ``source`` into ``network``; refuse a transfer below the encoder threshold."""
    state, kind, dropped = read_source_weights(source)
    if kind.startswith("nnunet-v2"):
        from autoseg.training.nnunet_weights import NNUNET_TO_AUTOSEG

        expected = NNUNET_TO_AUTOSEG[kind.split(":", 1)[1]]
        if architecture != expected:
            raise CheckpointError(f"an nnU-Net {kind.split(':', 1)[1]} maps onto autoseg's {expected}, not "
                                  f"{architecture}; train with -a {expected}", source)
    target = network.state_dict()  # every alias name (DynUNet reaches its blocks twice)
    canonical = _canonical_tensors(network)
    encoder = encoder_names(network, architecture)
    report = TransferReport(str(source), kind, architecture, unused=dict(dropped))
    take: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        if name in state and tuple(state[name].shape) == tuple(tensor.shape):
            take[name] = state[name]
    for name, tensor in canonical.items():
        if name in take:
            report.loaded.append(name)
            if name in encoder:
                report.encoder_tensors_loaded += 1
                report.encoder_elements_loaded += tensor.numel()
        else:
            report.reinitialised[name] = (f"shape {list(state[name].shape)} in the source, {list(tensor.shape)} here"
                                          if name in state else "not in the source")
        if name in encoder:
            report.encoder_tensors_total += 1
            report.encoder_elements_total += tensor.numel()
    for name, tensor in state.items():
        if name not in target:
            report.unused[name] = "no tensor of that name here"
        elif name not in take:
            report.unused[name] = f"shape {list(tensor.shape)}, here {list(target[name].shape)}"
    if report.encoder_fraction < MIN_ENCODER_FRACTION and not allow_partial:
        print(report.table(), file=sys.stderr, flush=True)
        raise CheckpointError(
            f"--pretrained loads only {100 * report.encoder_fraction:.1f} % of the {architecture} encoder's weights "
            f"({report.encoder_tensors_loaded} of {report.encoder_tensors_total} tensors; table above): another "
            "architecture or topology? Plan with `plan-and-preprocess --plans-from SOURCE`, or accept it with "
            "--allow-partial", source)
    with torch.no_grad():
        for name, tensor in take.items():
            target[name].copy_(tensor.to(target[name].dtype))
    if print_table:
        print(report.table(), flush=True)
    return report


def _canonical_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter and buffer once, under its first name (state_dict repeats shared modules)."""
    tensors = dict(network.named_parameters())
    tensors.update({name: b for name, b in network.named_buffers() if b is not None})
    return tensors
