from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.spec import load_dataset_spec
from autoseg.errors import PlanError
from autoseg.fingerprint import compute_fingerprint, load_fingerprint
from autoseg.planning.planner import PlanningContext, plan_architecture, plan_dataset
from autoseg.planning.plans import load_plans, save_plans
from autoseg.planning.spacing import fullres_spacing
from autoseg.networks.registry import ARCHITECTURES
from autoseg.records import dumps
from tests.conftest import edit_json, peers_python, shared_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, num_processes", [("Dataset004_Hippocampus", 2), ("Dataset027_ACDC", 2),
                                                  ("Dataset999_Synthetic", 1)])
def test_planner_reproduces_the_committed_plans(name, num_processes):
    """The committed fingerprint, planned again, gives the committed plans byte for byte, whether the
    architectures are planned one after another or side by side in worker processes (-np 2)."""
    fingerprint = load_fingerprint(REPO / "dataset_fingerprints" / f"{name}.json")
    committed = load_plans(REPO / "plans" / f"{name}.json")
    plans = plan_dataset(fingerprint, committed.labels, committed.gpu_memory_gb, num_processes=num_processes)
    assert dumps(plans) == (REPO / "plans" / f"{name}.json").read_text()


def test_hippocampus_plan_matches_nnunet_in_substance():
    """nnU-Net v2's nnUNetPlans.json for Dataset004_Hippocampus (nnUNetv2_plan_and_preprocess in the peers'
    environment, nnunetv2 2.8.1, 2026-12-05): 3d_fullres spacing 1 mm, patch 40x56x40, batch 7; 2d patch 56x40, batch 281;
    both with strides 1, 2, 2, 2, kernels 3, features 32-256, ZScoreNormalization, no 3d_lowres."""
    plans = load_plans(REPO / "plans" / "Dataset004_Hippocampus.json")
    full, flat = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert full.spacing == [1.0, 1.0, 1.0] and flat.spacing == [1.0, 1.0]
    for configuration, patch, stride in ((full, [40, 56, 40], [2, 2, 2]), (flat, [56, 40], [2, 2])):
        unet = configuration.architectures["unet"]
        assert unet.patch_size == patch and unet.strides == [[1] * len(patch)] + [stride] * 3
        assert unet.kernel_sizes == [[3] * len(patch)] * 4 and unet.features == [32, 64, 128, 256]
    assert full.architectures["unet"].batch_size == 7
    # nnU-Net's batch comes from its VRAM formula; ours from the measured memory model, capped as nnU-Net caps
    # it (5 % of the dataset's voxels): within a few images of nnU-Net's 281.
    assert abs(flat.architectures["unet"].batch_size - 281) <= 3
    assert plans.normalization[0].scheme == "zscore" and "3d_lowres" not in plans.configurations


def test_acdc_3d_plan_has_nnunets_topology():
    """nnU-Net v2's own planner (nnUNetv2_plan_and_preprocess on Dataset027_ACDC, nnUNetPlans.json)
    gives 3d_fullres patch 20x256x224, these strides and kernels (3x3x3 kept down to the bottleneck,
    where the in-plane axes have become the coarser ones) and a PlainConvUNet of 30,377,428
    parameters, 4,640 of them biases autoseg's network leaves out: those of convolutions
    InstanceNorm follows (which it cancels) and of the transposed convolutions."""
    unet = load_plans(REPO / "plans" / "Dataset027_ACDC.json").configurations["3d_fullres"].architectures["unet"]
    assert unet.patch_size == [20, 256, 224]
    assert unet.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert unet.kernel_sizes == [[1, 3, 3]] + [[3, 3, 3]] * 5
    assert unet.features == [32, 64, 128, 256, 320, 320]
    network = ARCHITECTURES["unet"].build(unet, 1, 4, 3, True)
    assert sum(p.numel() for p in network.parameters()) == 30_377_428 - 4_640 == unet.num_parameters


def test_hippocampus_fingerprint_is_reproduced():
    raw = shared_dataset("Dataset004_Hippocampus")
    fingerprint = compute_fingerprint(raw, num_processes=2, progress=False)
    assert dumps(fingerprint) == (REPO / "dataset_fingerprints" / "Dataset004_Hippocampus.json").read_text()


def test_anisotropic_rule_keeps_thin_slices_and_pools_in_plane_first():
    rng = np.random.default_rng(0)
    spacings = np.column_stack([rng.choice([5.0, 6.0, 8.0, 10.0], 50), np.full(50, 0.8), np.full(50, 0.8)])
    shapes = np.column_stack([rng.integers(8, 16, 50), np.full(50, 300), np.full(50, 280)])
    target = fullres_spacing(spacings, shapes)
    assert target[0] == pytest.approx(np.percentile(spacings[:, 0], 10))
    assert target[1:] == [0.8, 0.8]
    ctx = PlanningContext(8.0, 1, 3, dataset_voxels=1e9)
    plan = plan_architecture(ARCHITECTURES["unet"], 3, target, [12, 300 * 0.8 / 0.8, 280], ctx)
    assert plan.strides[1][0] == 1 and plan.strides[1][1:] == [2, 2], "the thick-slice axis is not pooled first"
    assert plan.kernel_sizes[0][0] == 1, "no 3-voxel kernel across thick slices"
    assert all(p % np.prod([s[a] for s in plan.strides]) == 0 for a, p in enumerate(plan.patch_size))
    assert plan.estimated_memory_gb <= 8.0


def test_memory_budget_shrinks_patch_and_batch():
    ctx_small = PlanningContext(2.0, 1, 2, dataset_voxels=1e10)
    ctx_large = PlanningContext(16.0, 1, 2, dataset_voxels=1e10)
    small = plan_architecture(ARCHITECTURES["unet"], 3, [1.0, 1.0, 1.0], [200, 200, 200], ctx_small)
    large = plan_architecture(ARCHITECTURES["unet"], 3, [1.0, 1.0, 1.0], [200, 200, 200], ctx_large)
    assert np.prod(small.patch_size) < np.prod(large.patch_size)
    assert small.estimated_memory_gb <= 2.0 and large.estimated_memory_gb <= 16.0
    assert small.batch_size >= 2


def test_lowres_is_planned_for_large_images(synthetic_raw):
    fingerprint = compute_fingerprint(synthetic_raw, 1, False)
    for case in fingerprint.cases:  # pretend every image is 8x larger along each in-plane axis
        case.shape_after_crop = [case.shape_after_crop[0] * 8, case.shape_after_crop[1] * 8, case.shape_after_crop[2] * 8]
    plans = plan_dataset(fingerprint, load_dataset_spec(synthetic_raw, False).labels, gpu_memory_gb=4.0,
                         architectures=["unet"])  # lowres is decided on the CNN U-Net's patch; one is enough
    assert "3d_lowres" in plans.configurations
    low, full = plans.configurations["3d_lowres"], plans.configurations["3d_fullres"]
    assert all(lo >= fu for lo, fu in zip(low.spacing, full.spacing)) and low.spacing != full.spacing


def test_edited_plans_are_validated(tmp_path):
    source = REPO / "plans" / "Dataset999_Synthetic.json"
    plans = load_plans(source)
    plans.configurations["3d_fullres"].architectures["unet"].patch_size = [15, 56, 56]
    save_plans(plans, tmp_path / "plans.json")
    with pytest.raises(PlanError, match="divisible"):
        load_plans(tmp_path / "plans.json")
    (tmp_path / "p2.json").write_text(source.read_text())
    edit_json(tmp_path / "p2.json", network_class_name="evil.module.Class")
    with pytest.raises(PlanError, match="unknown field"):
        load_plans(tmp_path / "p2.json")
    for field, value, problem in (("strides", [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "first stage's stride"),
                                  ("kernel_sizes", [[1, 3, 3], [2, 3, 3], [3, 3, 3], [3, 3, 3]], "odd and positive"),
                                  ("features", [32, 64, 0, 256], "features must be positive")):
        plans = load_plans(source)  # each a hand edit that builds a network whose output no longer fits
        setattr(plans.configurations["3d_fullres"].architectures["unet"], field, value)
        save_plans(plans, tmp_path / "p4.json")
        with pytest.raises(PlanError, match=problem):
            load_plans(tmp_path / "p4.json")
    plans = load_plans(source)
    plans.configurations["3d_fullres"].architectures["unet"].name = "os.system"
    save_plans(plans, tmp_path / "p3.json")
    with pytest.raises(PlanError, match="unknown architecture 'os.system'"):
        load_plans(tmp_path / "p3.json")


@pytest.mark.parametrize("gpu_memory_gb", [0.9, 1.5])
def test_small_budgets_end_in_a_plan_that_fits_or_a_clear_refusal(gpu_memory_gb):
    # Swin rounds an all-32 patch back up to 64 along one axis: shrinking must not go round in circles.
    import signal

    def too_slow(*_):
        raise AssertionError("planning did not finish: the patch search goes round in circles")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(300)
    try:
        ctx = PlanningContext(gpu_memory_gb, 1, 3, dataset_voxels=1e10)
        outcomes = {}
        for name, spec in ARCHITECTURES.items():
            try:
                plan = plan_architecture(spec, 3, [1.0, 1.0, 1.0], [36, 50, 35], ctx)
            except ValueError as exc:
                assert f"even the smallest patch needs more than {gpu_memory_gb} GB" in str(exc)
                outcomes[name] = "refused"
                continue
            assert plan.estimated_memory_gb <= gpu_memory_gb and plan.batch_size >= 2
            assert spec.check_plan(plan, 3) is None
            outcomes[name] = plan.patch_size
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["unet"] != "refused", outcomes
    if gpu_memory_gb >= 1.5:  # at 0.9 GB (0.4 GB past the CUDA context) no 3D Swin UNETR step fits
        assert outcomes["swin_unetr"] != "refused", "a narrower Swin UNETR fits where feature_size 48 does not"


def test_swin_feature_size_is_chosen_by_the_budget():
    swin = ARCHITECTURES["swin_unetr"]
    small = plan_architecture(swin, 3, [1.0, 1.0, 1.0], [36, 50, 35], PlanningContext(1.5, 1, 3, 1e10))
    large = plan_architecture(swin, 3, [1.0, 1.0, 1.0], [36, 50, 35], PlanningContext(8.0, 1, 3, 1e10))
    assert large.options["feature_size"] == 48 and large.patch_size == [64, 64, 64]
    assert small.options["feature_size"] in (36, 24, 12) and small.estimated_memory_gb <= 1.5
    assert swin.check_plan(small, 3) is None
    assert f"feature_size {small.options['feature_size']} chosen" in small.notes[-1]
    assert "feature_size 48: even the smallest patch needs more than 1.5 GB" in small.notes[-1]
    network = swin.build(small, 1, 3, 3, True)
    assert sum(p.numel() for p in network.parameters()) == small.num_parameters


# nnU-Net's own planner, run on autoseg's committed Hippocampus fingerprint in the peers' environment
# (/work/shared/peers/setup.sh makes it; PEERS_VENV points elsewhere). It reads the raw
# dataset.json and one image, and plans from the fingerprint handed to it: an independent second
# planner on the same facts, not a reference autoseg wrote itself.
NNUNET_PLAN = '''
import json, os, sys
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
plans = ExperimentPlanner("Dataset004_Hippocampus", gpu_memory_target_in_gb=8).plan_experiment()
print(json.dumps(plans))
'''


def _nnunet_fingerprint(fingerprint: dict) -> dict:
    """autoseg's fingerprint in nnU-Net's dataset_fingerprint.json layout."""
    properties = {str(i): {k: channel[k] for k in ("max", "mean", "median", "min", "percentile_00_5",
                                                   "percentile_99_5", "std")}
                  for i, channel in enumerate(fingerprint["foreground_intensity"])}
    return {"foreground_intensity_properties_per_channel": properties,
            "median_relative_size_after_cropping": fingerprint["median_relative_size_after_crop"],
            "shapes_after_crop": [case["shape_after_crop"] for case in fingerprint["cases"]],
            "spacings": [case["spacing"] for case in fingerprint["cases"]]}


def _nnunets_plans(tmp_path: Path, fingerprint: dict) -> dict:
    """nnU-Net's planner's plans for Hippocampus with ``fingerprint`` (autoseg's layout) as its fingerprint."""
    import json
    import os
    import subprocess

    python = peers_python()
    if not python.exists():
        pytest.skip(f"{python} is missing: nnU-Net's planner runs in the peers' environment "
                    "(/work/shared/peers/setup.sh makes it; PEERS_VENV points elsewhere)")
    raw = shared_dataset("Dataset004_Hippocampus")
    roots = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in roots.values():
        folder.mkdir()
    (roots["nnUNet_raw"] / raw.name).symlink_to(raw.resolve())
    (roots["nnUNet_preprocessed"] / raw.name).mkdir()
    (roots["nnUNet_preprocessed"] / raw.name / "dataset_fingerprint.json").write_text(
        json.dumps(_nnunet_fingerprint(fingerprint)))
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in roots.items()}}
    result = subprocess.run([str(python), "-c", NNUNET_PLAN], capture_output=True, text=True, env=env, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hippocampus_plan_equals_nnunets_planner_on_the_same_fingerprint(tmp_path):
    import json

    name = "Dataset004_Hippocampus"
    theirs = _nnunets_plans(tmp_path, json.loads((REPO / "dataset_fingerprints" / f"{name}.json").read_text()))
    ours = load_plans(REPO / "plans" / f"{name}.json")
    assert sorted(theirs["configurations"]) == sorted(ours.configurations)  # no 3d_lowres on either side
    full = ours.configurations["3d_fullres"]
    unet = full.architectures["unet"]
    their_full = theirs["configurations"]["3d_fullres"]
    kwargs = their_full["architecture"]["arch_kwargs"]
    assert full.spacing == their_full["spacing"]
    assert unet.patch_size == their_full["patch_size"] and unet.batch_size == their_full["batch_size"]
    assert unet.features == kwargs["features_per_stage"]
    assert unet.strides == kwargs["strides"] and unet.kernel_sizes == kwargs["kernel_sizes"]
    assert [n.scheme for n in ours.normalization] == ["zscore"] and their_full["normalization_schemes"] == [
        "ZScoreNormalization"]


def test_a_budget_no_architecture_fits_is_refused_with_the_flag_to_change():
    # Found by the transfer benchmark: 0.25 GB ended in an internal StopIteration, not a message.
    fingerprint = load_fingerprint(REPO / "dataset_fingerprints" / "Dataset004_Hippocampus.json")
    committed = load_plans(REPO / "plans" / "Dataset004_Hippocampus.json")
    with pytest.raises(PlanError, match=r"no architecture fits the memory budget of 0\.25 GB .*--gpu-memory-gb"):
        plan_dataset(fingerprint, committed.labels, 0.25)


def test_2d_slices_across_the_axis_nnunets_planner_transposes_first(tmp_path):
    """Hippocampus with its voxels made 4 mm along array axis 2 (a sagittal-like series): nnU-Net's planner
    transposes that axis first (``transpose_forward``), and its 2d configuration has the other two axes'
    spacing and median size; autoseg's 2d configuration must slice across the same axis with the same plane."""
    import json

    fingerprint = json.loads((REPO / "dataset_fingerprints" / "Dataset004_Hippocampus.json").read_text())
    for case in fingerprint["cases"]:
        case["spacing"] = [1.0, 1.0, 4.0]
    theirs = _nnunets_plans(tmp_path, fingerprint)
    (tmp_path / "fingerprint.json").write_text(json.dumps(fingerprint))
    committed = load_plans(REPO / "plans" / "Dataset004_Hippocampus.json")
    ours = plan_dataset(load_fingerprint(tmp_path / "fingerprint.json"), committed.labels, architectures=["unet"])
    config, their_2d = ours.configurations["2d"], theirs["configurations"]["2d"]
    assert theirs["transpose_forward"] == [2, 0, 1] and config.slice_axis == 2
    assert config.spacing == their_2d["spacing"] == [1.0, 1.0]
    assert np.allclose(config.median_shape, their_2d["median_image_size_in_voxels"], atol=0.5)


NNUNET_TOPOLOGY = '''
import json, sys
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
out = []
for spacing, patch in json.loads(sys.argv[1]):
    _, pools, convs, padded, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    out.append([[list(p) for p in pools], [list(c) for c in convs], [int(v) for v in padded]])
print(json.dumps(out))
'''


def test_unet_topology_is_nnunets_get_pool_and_conv_props():
    """Strides, kernels and padded patch against nnU-Net's own function, on isotropic, 2:1, 3:1, 4:1 and 8:1
    spacings (thick axis first or last) and 2D: until 2026-12-05 autoseg pooled a 2:1 axis at once (nnU-Net
    waits), and an axis too small to pool, being the finest, stopped the others early (a 16x14 bottleneck
    in-plane where nnU-Net goes on to 8x7). The one planned difference: at most MAX_STAGES stages."""
    import json
    import subprocess

    from autoseg.networks.topology import MAX_STAGES, unet_topology

    python = peers_python()
    if not python.exists():
        pytest.skip(f"{python} is missing: nnU-Net runs in the peers' environment (/work/shared/peers/setup.sh)")
    cases = [[list(spacing), list(patch)]
             for spacing in [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1), (5, 1.5, 1.5), (8, 1, 1), (1, 1, 4),
                             (2.5, 0.8, 0.8), (1.5, 0.7, 0.7)]
             for patch in [(32, 128, 128), (64, 128, 128), (20, 256, 224), (40, 56, 40), (128, 128, 128),
                           (16, 320, 320), (48, 192, 160)]]
    cases += [[list(spacing), list(patch)] for spacing in [(1, 1), (2, 1), (0.5, 0.5)]
              for patch in [(56, 40), (256, 224), (512, 256), (64, 64)]]
    result = subprocess.run([str(python), "-c", NNUNET_TOPOLOGY, json.dumps(cases)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    capped = 0
    for (spacing, patch), (strides, kernels, padded) in zip(cases, json.loads(result.stdout)):
        ours = unet_topology(patch, spacing)
        if len(strides) > MAX_STAGES:  # the cap: nnU-Net's first stages, and a bottleneck kernel of 3
            capped += 1
            strides, kernels = strides[:MAX_STAGES], kernels[:MAX_STAGES - 1] + [[3] * len(patch)]
            divisor = np.prod(strides, axis=0)
            padded = [int(-(-p // d) * d) for p, d in zip(patch, divisor)]
        assert (ours.strides, ours.kernel_sizes, ours.patch_size) == (strides, kernels, padded), (spacing, patch)
    assert capped < len(cases) // 10
