"""The planner: from a fingerprint and a memory budget to ``Plans``.

For each configuration (``2d``; ``3d_fullres``; ``3d_lowres`` when a full-resolution
patch would see less than a quarter of the median image) and each architecture in the
registry:

1. start from a patch with the aspect ratio of the target spacing and the volume of
   256^3 (3D) or 2048^2 (2D) voxels, clipped to the median image shape;
2. shape it with the architecture's topology rule (strides until the feature maps reach
   about 4 voxels, patch divisible by the strides);
3. measure the memory of one training step (``autoseg.networks.memory``) and, while a
   batch of 2 does not fit the budget, shrink the axis whose patch is largest relative
   to the median shape;
4. batch size: as many as fit, at least 2, at most what covers 5% of the dataset's
   voxels per step (nnU-Net's rule against overfitting small datasets).

The architectures of a configuration are planned side by side in ``num_processes`` worker
processes (``-np``): each one's memory measurements are Python-bound fake training steps
that one core runs at a time, so two cores plan a configuration in about half the time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from autoseg.errors import PlanError
from autoseg.fingerprint import DatasetFingerprint
from autoseg.networks.memory import MemoryEstimate
from autoseg.networks.registry import ARCHITECTURES, ArchitectureSpec
from autoseg.parallel import map_with_progress
from autoseg.planning.measurement_cache import network_identity, remembered_estimate
from autoseg.planning.normalization import plan_normalization
from autoseg.planning.plans import PLANS_SCHEMA_VERSION, ArchitecturePlan, ConfigurationPlan, Plans
from autoseg.planning.spacing import anisotropic_axis, fullres_spacing, resampled_shape
from autoseg.records import to_jsonable

INITIAL_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
MAX_DATASET_FRACTION_PER_STEP = 0.05
MIN_BATCH = 2
MIN_STAGES = 3  # input resolution and two downsamplings: the smallest U-Net MONAI's DynUNet builds
LOWRES_COVERAGE = 0.25  # plan 3d_lowres when the fullres patch covers less than this of the median image
LOWRES_STEP = 1.03


_ESTIMATES: dict[tuple, MemoryEstimate] = {}


@dataclass
class PlanningContext:
    gpu_memory_gb: float
    in_channels: int
    num_classes: int
    dataset_voxels: float  # sum over cases of voxels at this configuration's spacing


def plan_dataset(fingerprint: DatasetFingerprint, labels: dict, gpu_memory_gb: float = 8.0,
                 architectures: list[str] | None = None, regions_class_order: list[int] | None = None,
                 num_processes: int = 1) -> Plans:
    names = architectures or [n for n, spec in ARCHITECTURES.items() if spec.available()]
    spacings = np.array([c.spacing for c in fingerprint.cases], dtype=float)
    shapes = np.array([c.shape_after_crop for c in fingerprint.cases], dtype=float)
    has_regions = any(isinstance(v, list) for v in labels.values())
    ignore = labels.get("ignore")
    num_classes = (sum(1 for k in labels if k not in ("background", "ignore")) if has_regions
                   else sum(1 for k in labels if k != "ignore"))
    in_channels = len(fingerprint.channel_names)
    configurations: dict[str, ConfigurationPlan] = {}
    notes: list[str] = []

    if fingerprint.is_2d:
        target = [999.0] + [float(s) for s in np.median(spacings[:, 1:], axis=0)]
    else:
        target = fullres_spacing(spacings, shapes)
    per_case_shapes = np.array([resampled_shape(list(sh), list(sp), target) for sh, sp in zip(shapes, spacings)])
    if fingerprint.is_2d:
        per_case_shapes[:, 0] = 1

    def context(case_shapes: np.ndarray, dims: int) -> PlanningContext:
        voxels = float(np.sum(np.prod(case_shapes[:, -dims:], axis=1)))
        if dims == 2:  # a 2D step samples slices: the dataset is all slices of all cases
            voxels = float(np.sum(np.prod(case_shapes, axis=1)))
        return PlanningContext(gpu_memory_gb, in_channels, num_classes, voxels)

    # Slices across the coarsest axis (nnU-Net's transpose_forward); a 2D image's is its placeholder axis 0.
    slice_axis = int(np.argmax(target))
    in_plane = [axis for axis in range(3) if axis != slice_axis]
    median_2d = [int(v) for v in np.median(per_case_shapes[:, in_plane], axis=0)]
    requests = [ConfigurationRequest("2d", 2, [target[axis] for axis in in_plane], median_2d,
                                     context(per_case_shapes, 2), names,
                                     anisotropic_axis(target) if not fingerprint.is_2d else None)]
    if not fingerprint.is_2d:
        median_3d = [int(v) for v in np.median(per_case_shapes, axis=0)]
        requests.append(ConfigurationRequest("3d_fullres", 3, target, median_3d, context(per_case_shapes, 3), names,
                                             anisotropic_axis(target)))
    # One pool for both: the workers take the next architecture of either, so one slow one idles no core.
    configurations.update((plan.name, plan) for plan in _plan_configurations(requests, num_processes))
    configurations["2d"].slice_axis = slice_axis
    if not fingerprint.is_2d:
        full = configurations["3d_fullres"]
        coverage = np.prod(full.architectures[full.default_architecture].patch_size) / np.prod(median_3d)
        if coverage < LOWRES_COVERAGE:
            configurations["3d_lowres"] = _plan_lowres(target, spacings, shapes, names, gpu_memory_gb,
                                                       in_channels, num_classes, num_processes)
        else:
            notes.append(f"no 3d_lowres: the 3d_fullres patch covers {coverage:.0%} of the median image "
                         f"(planned only below {LOWRES_COVERAGE:.0%})")
    default = "2d" if fingerprint.is_2d else "3d_fullres"
    plans = Plans(
        schema_version=PLANS_SCHEMA_VERSION,
        dataset_name=fingerprint.dataset_name,
        channel_names=list(fingerprint.channel_names),
        labels=labels,
        ignore_label=int(ignore) if ignore is not None else None,
        has_regions=has_regions,
        normalization=plan_normalization(fingerprint),
        gpu_memory_gb=gpu_memory_gb,
        configurations=configurations,
        default_configuration=default,
        original_median_spacing=[float(v) for v in np.median(spacings, axis=0)],
        original_median_shape=[int(v) for v in np.median(shapes, axis=0)],
        notes=notes,
        regions_class_order=list(regions_class_order) if has_regions and regions_class_order else None,
    )
    for config in plans.configurations.values():
        config.data_identifier = f"{config.name}_{preprocessing_digest(plans, config.name)[:8]}"
    return plans


def _plan_lowres(target, spacings, shapes, names, gpu_memory_gb, in_channels, num_classes,
                 num_processes) -> ConfigurationPlan:
    """Coarsen the spacing in 3% steps until the planned patch covers a quarter of the median image."""
    lowres = list(target)
    for _ in range(200):
        finest = min(lowres)
        # Coarsen the fine axes first so that anisotropic data become more isotropic.
        lowres = [s * LOWRES_STEP if s < 2 * finest else s for s in lowres]
        case_shapes = np.array([resampled_shape(list(sh), list(sp), lowres) for sh, sp in zip(shapes, spacings)])
        median = [int(v) for v in np.median(case_shapes, axis=0)]
        ctx = PlanningContext(gpu_memory_gb, in_channels, num_classes, float(np.sum(np.prod(case_shapes, axis=1))))
        # Search with the CNN U-Net alone (or the first architecture asked for, without it), then plan every
        # architecture at the spacing found.
        searcher = ["unet"] if "unet" in names else names[:1]
        search, = _plan_configurations([ConfigurationRequest("3d_lowres", 3, lowres, median, ctx, searcher,
                                                             anisotropic_axis(lowres))], num_processes)
        patch = search.architectures[search.default_architecture].patch_size
        if np.prod(patch) / np.prod(median) >= LOWRES_COVERAGE:
            break
    return _plan_configurations([ConfigurationRequest("3d_lowres", 3, lowres, median, ctx, names,
                                                      anisotropic_axis(lowres))], num_processes)[0]


@dataclass
class ConfigurationRequest:
    """A configuration to plan: its grid and the architectures to plan on it."""
    name: str
    dims: int
    spacing: list[float]
    median_shape: list[int]
    ctx: PlanningContext
    architectures: list[str]
    aniso_axis: int | None


def _plan_configurations(requests: list[ConfigurationRequest], num_processes: int) -> list[ConfigurationPlan]:
    """Every architecture of every request, over ``num_processes`` workers, assembled per configuration."""
    def task(r: ConfigurationRequest, arch_name: str) -> tuple:
        return arch_name, r.dims, r.spacing, r.median_shape, r.ctx

    if num_processes <= 1:  # one after another: a configuration that fits nothing stops at once
        return [_configuration_plan(r, [(a, _plan_named(task(r, a))) for a in r.architectures]) for r in requests]
    tasks = [task(r, arch_name) for r in requests for arch_name in r.architectures]
    # In the order asked for, whichever worker finished first: the plan does not depend on -np.
    outcomes = iter(map_with_progress(_plan_named, tasks, num_processes, "plan", progress=False))
    return [_configuration_plan(r, [(arch_name, next(outcomes)) for arch_name in r.architectures]) for r in requests]


def _configuration_plan(request: ConfigurationRequest, outcomes: list[tuple[str, ArchitecturePlan | str]]
                        ) -> ConfigurationPlan:
    planned = {}
    notes = []
    for arch_name, outcome in outcomes:
        if isinstance(outcome, str):
            notes.append(f"{arch_name} not planned: {outcome}")
        else:
            planned[arch_name] = outcome
    if not planned:
        raise PlanError(f"{request.name}: no architecture fits the memory budget of {request.ctx.gpu_memory_gb:g} "
                        f"GB ({'; '.join(notes)}); plan for a larger one with --gpu-memory-gb")
    default = "unet" if "unet" in planned else next(iter(planned))
    return ConfigurationPlan(
        name=request.name, dimensions=request.dims, spacing=[float(f"{s:.10g}") for s in request.spacing],
        median_shape=list(request.median_shape), image_resampling_order=3, label_resampling_order=1,
        anisotropic_axis=request.aniso_axis, architectures=planned, default_architecture=default,
        data_identifier="", notes=notes)


def _plan_named(task: tuple) -> ArchitecturePlan | str:
    """``plan_architecture`` of a registry name (what a worker process is sent), or why it does not fit."""
    arch_name, dims, spacing, median_shape, ctx = task
    try:
        return plan_architecture(ARCHITECTURES[arch_name], dims, spacing, median_shape, ctx)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        return str(exc)


def plan_architecture(spec: ArchitectureSpec, dims: int, spacing: list[float], median_shape: list[int],
                      ctx: PlanningContext) -> ArchitecturePlan:
    """Patch, batch and topology of one architecture within the memory budget.

    Where the architecture offers choices (Swin UNETR's ``feature_size``), each is planned
    and the most preferred one is kept unless another allows a patch more than twice as
    large: a narrower network that sees the organ whole beats a wider one that sees a part."""
    planned, refusals = [], []  # (choice, plan) pairs; reasons of the choices that do not fit
    choices = list(spec.option_choices)
    for index, choice in enumerate(choices):
        try:
            planned.append((choice, _plan_with_choice(spec, choice, dims, spacing, median_shape, ctx)))
        except ValueError as exc:
            refusals.append(f"{_describe(choice)}: {exc}" if choice else str(exc))
        later = choices[index + 1:]
        if len(planned) == 1 and later and _no_choice_can_outgrow(planned[0][1], spec, later, dims, spacing,
                                                                  median_shape):
            # Planning the others (a fake training step each) could not change the choice.
            chosen_choice, chosen = planned[0]
            chosen.notes.append(f"{_describe(chosen_choice)} chosen (its patch is at least half the largest any "
                                f"choice could take; {', '.join(map(_describe, later))} not planned)"
                                + (f"; refused: {'; '.join(refusals)}" if refusals else ""))
            return chosen
    if not planned:
        raise ValueError("; ".join(refusals))
    largest = max(math.prod(plan.patch_size) for _, plan in planned)
    chosen_choice, chosen = next((c, p) for c, p in planned if 2 * math.prod(p.patch_size) >= largest)
    if len(spec.option_choices) > 1:
        others = [f"{_describe(choice)}: patch {'x'.join(map(str, plan.patch_size))}, batch {plan.batch_size}"
                  for choice, plan in planned if plan is not chosen] + refusals
        chosen.notes.append(f"{_describe(chosen_choice)} chosen (the most preferred whose patch is at least half "
                            f"the largest); others: {'; '.join(others)}")
    return chosen


def _no_choice_can_outgrow(plan: ArchitecturePlan, spec: ArchitectureSpec, choices: list[dict], dims: int,
                           spacing: list[float], median_shape: list[int]) -> bool:
    """Whether ``plan``'s patch is at least half of any patch ``choices`` could be planned at: each starts from
    the initial patch's topology and only shrinks, so that patch bounds it."""
    initial = _initial_patch(dims, spacing, median_shape)
    bound = max(math.prod(spec.topology(initial, spacing, **choice).patch_size) for choice in choices)
    return 2 * math.prod(plan.patch_size) >= bound


def _describe(choice: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in choice.items())


def _plan_with_choice(spec: ArchitectureSpec, choice: dict, dims: int, spacing: list[float],
                      median_shape: list[int], ctx: PlanningContext) -> ArchitecturePlan:
    options = {**spec.default_options, **choice}
    budget = ctx.gpu_memory_gb * 2**30
    patch = _initial_patch(dims, spacing, median_shape)

    def estimate(topology) -> MemoryEstimate:
        # Saved activations grow exactly linearly with the voxels of a patch for a fixed
        # topology (see networks/memory.py), so one measurement serves every patch of it.
        key = network_identity(spec.name, dims, ctx.in_channels, ctx.num_classes, options, topology.strides,
                               topology.kernel_sizes, topology.features)
        if key not in _ESTIMATES:
            plan = _arch_plan(spec, topology, 1, options)
            # A fixed probe per topology (twice the stride product) keeps the result independent
            # of which patch happened to be measured first.
            probe = [2 * d for d in topology.divisor()]
            # Its fake training step is most of planning's time, and a number: kept between runs.
            _ESTIMATES[key] = remembered_estimate(
                lambda: spec.build(plan, ctx.in_channels, ctx.num_classes, dims, True), ctx.in_channels, probe, key)
        return _ESTIMATES[key]

    topology = spec.topology(patch, spacing, **choice)
    while estimate(topology).training_bytes(MIN_BATCH, math.prod(topology.patch_size)) > budget:
        topology = _smaller_topology(spec, topology, spacing, median_shape, choice)
        if topology is None:
            raise ValueError(f"even the smallest patch needs more than {ctx.gpu_memory_gb} GB")
    per_step = estimate(topology)
    voxels = math.prod(topology.patch_size)
    fits = _batches_that_fit(per_step, voxels, budget)
    cap = int(MAX_DATASET_FRACTION_PER_STEP * ctx.dataset_voxels / voxels)
    batch = max(MIN_BATCH, min(fits, cap))
    plan = _arch_plan(spec, topology, batch, options)
    plan.num_parameters = per_step.parameter_count
    plan.estimated_memory_gb = round(per_step.training_bytes(batch, voxels) / 2**30, 3)
    plan.notes.append(f"batch {batch}: {fits} fit in {ctx.gpu_memory_gb} GB, 5% of the dataset's voxels allow {cap}")
    return plan


def _batches_that_fit(per_step: MemoryEstimate, voxels: int, budget: float) -> int:
    """The largest batch whose step fits ``budget``: the step grows with the batch but not linearly (a
    recomputed scan block stops growing once full), so it is searched, doubling then bisecting."""
    if per_step.training_bytes(1, voxels) > budget:
        return 0
    low, high = 1, 2
    while per_step.training_bytes(high, voxels) <= budget:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if per_step.training_bytes(middle, voxels) <= budget else (low, middle)
    return low


def _smaller_topology(spec: ArchitectureSpec, topology, spacing: list[float], median_shape: list[int],
                      choice: dict):
    """The topology of a patch one stride-divisor step shorter along the axis largest relative
    to the image (the next axis where that gives no smaller patch), or None when no axis can
    shrink. An architecture's own rounding may undo a step (Swin doubles an all-32 patch back),
    so a step counts only when the patch it yields really has fewer voxels."""
    ratios = [p / m for p, m in zip(topology.patch_size, median_shape)]
    divisor = topology.divisor()
    voxels = math.prod(topology.patch_size)
    for axis in (int(a) for a in np.argsort(ratios, kind="stable")[::-1]):
        if topology.patch_size[axis] - divisor[axis] < divisor[axis]:
            continue
        patch = list(topology.patch_size)
        patch[axis] -= divisor[axis]
        smaller = spec.topology(patch, spacing, **choice)
        # Fewer than MIN_STAGES is no U-Net (MONAI's DynUNet refuses it): not a way down.
        keeps_stages = len(smaller.strides) >= min(MIN_STAGES, len(topology.strides))
        if math.prod(smaller.patch_size) < voxels and keeps_stages:
            return smaller
    return None


def _arch_plan(spec: ArchitectureSpec, topology, batch: int, options: dict) -> ArchitecturePlan:
    return ArchitecturePlan(name=spec.name, patch_size=list(topology.patch_size), batch_size=batch,
                            kernel_sizes=topology.kernel_sizes, strides=topology.strides,
                            features=list(topology.features), options=dict(options))


def _initial_patch(dims: int, spacing: list[float], median_shape: list[int]) -> list[int]:
    inverse = 1.0 / np.asarray(spacing, dtype=float)
    patch = inverse * (INITIAL_PATCH_VOXELS[dims] / np.prod(inverse)) ** (1.0 / dims)
    return [int(min(round(p), m)) for p, m in zip(patch, median_shape)]


def preprocessing_digest(plans: Plans, configuration: str) -> str:
    """Digest of everything that shapes a preprocessed case of ``configuration``."""
    config = plans.configurations[configuration]
    relevant = {
        "normalization": to_jsonable(plans.normalization),
        "labels": plans.labels,
        "spacing": config.spacing,
        "dimensions": config.dimensions,
        "orders": [config.image_resampling_order, config.label_resampling_order, config.anisotropic_axis],
    }
    if config.slicing_axis != 0:  # only then: stores sliced across axis 0 keep their identifiers
        relevant["slice_axis"] = config.slicing_axis
    if plans.masked_channels:
        # only then: the background outside the non-zero region is marked in the stored segmentation (older
        # stores of such plans lack the mark and are preprocessed again; others keep their digest)
        relevant["outside_nonzero_marked"] = True
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
