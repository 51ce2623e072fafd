"""``plan-and-preprocess --plans-from SOURCE``: plan a dataset with another dataset's networks.

nnU-Net's ``move_plans_between_datasets``: the target gets the source's configurations (target
spacing, and per architecture the topology, patch and batch), so a network trained on the
source fits the target tensor for tensor and ``train --pretrained`` loads all of it but the
input stem (when the channel count differs) and the output heads (when the label set does).
What describes the target's own data stays the target's: intensity normalisation (a CT
window learnt on the source would be wrong for the target's scans), channels, labels,
regions, median image sizes.

    plans = plans_from_source(planned_for_target, load_plans(source_plans_file), "Dataset004_Hippocampus")
"""

from __future__ import annotations

import copy

from autoseg.errors import PlanError
from autoseg.planning.plans import Plans
from autoseg.planning.planner import preprocessing_digest
from autoseg.planning.spacing import resampled_shape


def plans_from_source(target: Plans, source: Plans, source_name: str) -> Plans:
    """``target`` (planned for its own data) with ``source``'s configurations."""
    target_is_2d = "3d_fullres" not in target.configurations
    plans = copy.deepcopy(target)
    plans.configurations, skipped = {}, []
    for name, config in source.configurations.items():
        if target_is_2d and config.dimensions == 3:
            skipped.append(name)  # 2D images have no third axis to run a 3D network over
            continue
        config = copy.deepcopy(config)
        # The median image of the target at the source's spacing (a record: planning used it, nothing downstream).
        spacing = list(config.spacing)
        if config.dimensions == 2:  # slices across the target's own coarsest axis, which keeps its spacing
            own = target.configurations.get("2d")
            config.slice_axis = own.slice_axis if own is not None else config.slice_axis
            spacing.insert(config.slicing_axis, target.original_median_spacing[config.slicing_axis])
        shape = resampled_shape(target.original_median_shape, target.original_median_spacing, spacing)
        config.median_shape = ([n for axis, n in enumerate(shape) if axis != config.slicing_axis]
                               if config.dimensions == 2 else shape)
        for arch in config.architectures.values():
            arch.notes = arch.notes + [f"from {source_name}'s plans (--plans-from): the source's topology, patch "
                                       f"and batch; parameters and memory as planned there for "
                                       f"{source.num_input_channels} channel(s), {source.num_segmentation_heads} "
                                       f"output(s)"]
        plans.configurations[name] = config
    if not plans.configurations:
        raise PlanError(f"none of {source_name}'s configurations ({', '.join(skipped)}) fits a 2D dataset")
    plans.default_configuration = (source.default_configuration if source.default_configuration in plans.configurations
                                   else next(iter(plans.configurations)))
    for config in plans.configurations.values():  # the target's normalisation and labels shape its data
        config.data_identifier = f"{config.name}_{preprocessing_digest(plans, config.name)[:8]}"
    plans.notes = plans.notes + [f"configurations from {source_name} (--plans-from); normalisation, channels and "
                                 f"labels of {target.dataset_name}"] + (
        [f"left out {', '.join(skipped)}: 3D configurations of {source_name} on a 2D dataset"] if skipped else [])
    return plans
