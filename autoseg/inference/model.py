"""Finding and loading trained models: plans, checkpoints (``weights_only=True``), networks.

A trained model of configuration C and architecture A is the folder
``AUTOSEG_RESULTS/DatasetNNN_Name/C__A/`` with one ``fold_N/`` per trained fold, each
holding ``checkpoint_final.pt`` (``checkpoint_best.pt``/``checkpoint_latest.pt`` while
training runs) and a copy of ``plans.json``. As in nnU-Net, only a finished fold
(``checkpoint_final.pt``) is used unless another checkpoint is asked for by name, and
every fold must have been trained on the plan the model is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoseg.errors import CheckpointError, PlanError
from autoseg.networks.memory_format import ChannelsLast, runs_channels_last
from autoseg.networks.registry import build_network
from autoseg.planning.plans import Plans, load_plans

FINAL_CHECKPOINT = "checkpoint_final.pt"


@dataclass
class TrainedModel:
    plans: Plans
    configuration: str
    architecture: str
    networks: list[nn.Module]
    folds: list[str]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint; anything but plain tensors is refused, never executed."""
    return weights_of(load_checkpoint_content(path), Path(path))


def load_checkpoint_content(path: str | Path):
    """What a checkpoint file holds, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint does not exist", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and weights-only errors all mean the same to a user
        raise CheckpointError(f"not a valid autoseg checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200]})", path) from None


def weights_of(content, path: Path) -> dict[str, torch.Tensor]:
    state = content.get("model") if isinstance(content, dict) and "model" in content else content
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError("does not hold a state dict of network weights", path)
    return state


def load_network_weights(network: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``network.load_state_dict(weights)``, a mismatch reported as ``CheckpointError`` naming ``path``.

    The one known cause besides a changed plan: U-Nets trained before 2026-12-05 on anisotropic
    plans had MONAI DynUNet's decoder kernels (the stage below's), now nnU-Net's (networks/unet.py)."""
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc).splitlines()[0])
        hint = ("; U-Nets trained before 2026-12-05 on anisotropic plans (1x3x3 stages) had other decoder "
                "kernels and must be retrained" if ".upsamples." in str(exc) else "")
        raise CheckpointError(f"weights do not fit the planned network ({first[:200]}){hint}", path) from None


def find_checkpoint(fold_dir: Path, name: str | None = None) -> Path:
    """``fold_dir/name``, by default the finished fold's ``checkpoint_final.pt``: a fold still training (or
    stopped) has only best/latest checkpoints, used only when asked for by name."""
    wanted = name or FINAL_CHECKPOINT
    if (fold_dir / wanted).is_file():
        return fold_dir / wanted
    others = sorted(p.name for p in fold_dir.glob("checkpoint_*.pt"))
    if name is None and others:
        raise CheckpointError(f"the fold's training has not finished (no {FINAL_CHECKPOINT}; {', '.join(others)} "
                              "there): finish it with `autoseg train ... --continue`, or ask for one of those with "
                              "--checkpoint", fold_dir)
    raise CheckpointError(f"no {wanted} in the fold folder" + (f" (there: {', '.join(others)})" if others else ""),
                          fold_dir)


def check_fold_plan(trained_on: dict | None, plans: Plans, configuration: str, architecture: str | None,
                    path: Path) -> None:
    """Refuse a fold whose checkpoint records another plan than ``plans`` (re-planned and partly retrained
    folds would otherwise be averaged, each fed data preprocessed for the other's plan)."""
    if not isinstance(trained_on, dict):
        return  # packaged weights (stripped; the package checked them when made) or an older checkpoint
    arch = plans.architecture(configuration, architecture)
    expected = {"data_identifier": plans.configuration(configuration).data_identifier,
                "patch_size": list(arch.patch_size), "num_classes": plans.num_segmentation_heads}
    differing = sorted(key for key, value in expected.items() if key in trained_on and trained_on[key] != value)
    if differing:
        raise CheckpointError(f"was trained on another plan than the model's plans.json (differs in "
                              f"{', '.join(f'{k}: {trained_on[k]} there, {expected[k]} here' for k in differing)}); "
                              "retrain this fold on the present plan, or leave it out with -f", path)


def model_plans(model_dir: Path, fold_dirs: list[Path], fallback: Path | None) -> Plans:
    for candidate in [d / "plans.json" for d in fold_dirs] + [model_dir / "plans.json"] + ([fallback] if fallback else []):
        if candidate.is_file():
            return load_plans(candidate)
    raise PlanError("no plans.json beside the trained model", model_dir)


def load_trained_model(model_dir: str | Path, folds: list[str], configuration: str, architecture: str | None,
                       device: torch.device, plans_fallback: Path | None = None,
                       checkpoint_name: str | dict[str, str] | None = None) -> TrainedModel:
    """The folds' networks. ``checkpoint_name``: one file name for every fold, or one per fold (a package's
    choice); by default each fold's ``checkpoint_final.pt``."""
    model_dir = Path(model_dir)
    fold_dirs = [model_dir / f"fold_{f}" for f in folds]
    missing = [str(d) for d in fold_dirs if not d.is_dir()]
    if missing:
        raise CheckpointError(f"fold folder(s) missing: {', '.join(missing)}", model_dir)
    plans = model_plans(model_dir, fold_dirs, plans_fallback)
    config = plans.configuration(configuration)
    arch_plan = plans.architecture(configuration, architecture)
    networks = []
    for fold_dir in fold_dirs:
        # Built as trained (with its deep-supervision heads, so the weights fit); in eval mode
        # every architecture returns the full-resolution logits only.
        network = build_network(arch_plan, plans.num_input_channels, plans.num_segmentation_heads,
                                config.dimensions, deep_supervision=True)
        fold = fold_dir.name[len("fold_"):]
        checkpoint = find_checkpoint(fold_dir, checkpoint_name.get(fold) if isinstance(checkpoint_name, dict)
                                     else checkpoint_name)
        content = load_checkpoint_content(checkpoint)
        check_fold_plan(content.get("plan") if isinstance(content, dict) else None, plans, configuration,
                        architecture, checkpoint)
        load_network_weights(network, weights_of(content, checkpoint), checkpoint)
        del content
        if runs_channels_last(arch_plan.name, config.dimensions, device):
            network = ChannelsLast(network, config.dimensions)
        networks.append(network.to(device).eval())
    return TrainedModel(plans, configuration, arch_plan.name, networks, list(folds))
