"""The Plans record: the contract between planning and everything downstream.

Training and inference read these fields and re-derive nothing. Users may edit
``plans.json`` (a different patch, batch or spacing); ``load_plans`` validates it
against this schema, and architectures are chosen by a name in autoseg's own
registry, never by a class path written in the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import PlanError
from autoseg.records import load_record, save_json

PLANS_SCHEMA_VERSION = 1


@dataclass
class ChannelNormalization:
    """How one input channel is normalised.

    scheme: ``ct`` (clip to ``clip_low``/``clip_high`` then z-score with the dataset's
    foreground ``mean``/``std``), ``zscore`` (per image), ``zscore_mask`` (per image,
    statistics and output restricted to the non-zero mask), ``rescale01`` (per image
    min/max to [0, 1]), ``rgb255`` (divided by 255: 8-bit colour, one scale for all images) or ``none``.
    """

    channel_name: str
    scheme: str
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class ArchitecturePlan:
    """One architecture planned for one configuration.

    ``name`` is a key of ``autoseg.networks.registry.ARCHITECTURES``. The topology
    lists hold one entry per resolution stage: ``strides[0]`` is the stride of the
    first stage (all ones for U-Nets), ``features[i]`` its channel count.
    """

    name: str
    patch_size: list[int]
    batch_size: int
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    features: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    num_parameters: int = 0
    estimated_memory_gb: float = 0.0
    flops_per_patch: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class ConfigurationPlan:
    """A configuration: the resolution data is resampled to and the networks planned for it.

    ``spacing`` has one entry per network dimension (array order). A ``2d`` configuration
    of a 3D dataset works on slices across ``slice_axis``, which is never resampled; its
    ``spacing`` and ``median_shape`` are those of the other two axes, in array order.
    """

    name: str
    dimensions: int
    spacing: list[float]
    median_shape: list[int]
    image_resampling_order: int
    label_resampling_order: int
    # Axis (in the 3D array) resampled with order 0 because it is much coarser than the others
    # (nnU-Net's "separate z"): interpolating across 5-10 mm slices blurs more than it helps.
    anisotropic_axis: int | None
    architectures: dict[str, ArchitecturePlan]
    default_architecture: str
    data_identifier: str
    notes: list[str] = field(default_factory=list)
    # 2D configurations: the array axis slices are taken across, the coarsest of the target spacing
    # (nnU-Net's transpose_forward puts it first): a sagittal series stored with x thick is sliced
    # across x, not into 5 mm-wide strips. The preprocessed arrays hold it first. None for 3D
    # configurations; plans written before the field slice across axis 0.
    slice_axis: int | None = None

    @property
    def slicing_axis(self) -> int:
        """The array axis a 2D configuration slices across (0 where the plan predates ``slice_axis``)."""
        return self.slice_axis or 0


@dataclass
class Plans:
    schema_version: int
    dataset_name: str
    channel_names: list[str]
    # Label names to values as in dataset.json: an int per class, or a list of ints for a region.
    labels: dict[str, Any]
    ignore_label: int | None
    has_regions: bool
    normalization: list[ChannelNormalization]
    gpu_memory_gb: float
    configurations: dict[str, ConfigurationPlan]
    default_configuration: str
    original_median_spacing: list[float]
    original_median_shape: list[int]
    notes: list[str] = field(default_factory=list)
    # Region-based plans: the label value each region writes, in order (later regions overwrite
    # earlier ones), as in nnU-Net's dataset.json; None for plain labels.
    regions_class_order: list[int] | None = None

    @property
    def regions(self) -> list[list[int]]:
        """Region-based plans: the label values of each network output, in label order."""
        return [list(v) if isinstance(v, list) else [v] for k, v in self.labels.items()
                if k not in ("background", "ignore")]

    @property
    def masked_channels(self) -> tuple[int, ...]:
        """Channels normalised inside the non-zero region (``zscore_mask``): zero outside it, in training too."""
        return tuple(c for c, norm in enumerate(self.normalization) if norm.scheme == "zscore_mask")

    @property
    def num_input_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_segmentation_heads(self) -> int:
        """Network outputs: one per class including background, or one per region."""
        if self.has_regions:
            return sum(1 for name in self.labels if name not in ("background", "ignore"))
        return sum(1 for name in self.labels if name != "ignore")

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise PlanError(f"configuration '{name}' is not planned; planned: {sorted(self.configurations)}")
        return self.configurations[name]

    def architecture(self, configuration: str, architecture: str | None = None) -> ArchitecturePlan:
        config = self.configuration(configuration)
        name = architecture or config.default_architecture
        if name not in config.architectures:
            raise PlanError(f"architecture '{name}' is not planned for {configuration}; "
                            f"planned: {sorted(config.architectures)}")
        return config.architectures[name]


def save_plans(plans: Plans, path: str | Path) -> None:
    save_json(plans, path)


def load_plans(path: str | Path) -> Plans:
    plans = load_record(Plans, path, PlanError, PLANS_SCHEMA_VERSION)
    _validate(plans, Path(path))
    return plans


def _validate(plans: Plans, path: Path) -> None:
    from autoseg.networks.registry import ARCHITECTURES

    if len(plans.normalization) != len(plans.channel_names):
        raise PlanError("normalization must have one entry per channel", path)
    for norm in plans.normalization:
        if norm.scheme not in ("ct", "zscore", "zscore_mask", "rescale01", "rgb255", "none"):
            raise PlanError(f"unknown normalization scheme '{norm.scheme}'", path)
        if norm.scheme == "ct" and None in (norm.clip_low, norm.clip_high, norm.mean, norm.std):
            raise PlanError("ct normalization needs clip_low, clip_high, mean and std", path)
    if plans.has_regions and (plans.regions_class_order is None
                              or len(plans.regions_class_order) != len(plans.regions)):
        raise PlanError("region-based plans need regions_class_order with one label value per region", path)
    if plans.default_configuration not in plans.configurations:
        raise PlanError(f"default_configuration '{plans.default_configuration}' is not planned", path)
    for cname, config in plans.configurations.items():
        if config.dimensions not in (2, 3) or len(config.spacing) != config.dimensions:
            raise PlanError(f"{cname}: dimensions must be 2 or 3 and spacing must have that many entries", path)
        if any(s <= 0 for s in config.spacing):
            raise PlanError(f"{cname}: spacing must be positive", path)
        if config.slice_axis is not None and (config.dimensions != 2 or config.slice_axis not in (0, 1, 2)):
            raise PlanError(f"{cname}: slice_axis must be 0, 1 or 2, and only a 2D configuration has one "
                            f"(got {config.slice_axis})", path)
        if config.default_architecture not in config.architectures:
            raise PlanError(f"{cname}: default_architecture '{config.default_architecture}' is not planned", path)
        for aname, arch in config.architectures.items():
            if arch.name not in ARCHITECTURES:
                raise PlanError(f"{cname}/{aname}: unknown architecture '{arch.name}'; "
                                f"known: {sorted(ARCHITECTURES)}", path)
            if len(arch.patch_size) != config.dimensions or any(p < 1 for p in arch.patch_size):
                raise PlanError(f"{cname}/{aname}: patch_size must have {config.dimensions} positive entries", path)
            if arch.batch_size < 1:
                raise PlanError(f"{cname}/{aname}: batch_size must be at least 1", path)
            problem = ARCHITECTURES[arch.name].check_plan(arch, config.dimensions)
            if problem:
                raise PlanError(f"{cname}/{aname}: {problem}", path)
