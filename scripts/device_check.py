#!/usr/bin/env python3
"""One prepared GPU check: the CUDA paths of autoseg measured once, in at most 8 minutes.

    python scripts/device_check.py [--json device_check.json] [--data ../shared/data] [--tiny]

Prints one table and writes the same numbers as JSON. On a CUDA GPU (the one to expect: an
H200, 16 cores, no network) it measures:

1. every planned 3d_fullres architecture of Hippocampus and ACDC at its planned patch and
   batch: one training step as the loop takes it (autocast in the dtype training picks,
   Dice + CE with deep supervision, clipping, SGD; from a batch in pinned host memory),
   its median time, the peak CUDA memory (allocator peak plus the CUDA context) and the
   plan's memory-model estimate, with their ratio (goal: 0.75 to 1.25);
2. training iterations per second of the default U-Net against nnU-Net's
   ``nnUNetTrainer.train_step`` on the same patch, batch and topology (each side one step
   from a host batch, no data loading); only where ``nnunetv2`` imports, said otherwise;
3. ``torchrun`` training for 2 iterations through validation and the final prediction of
   the fold's validation cases, with the process group that training creates (NCCL);
4. ``mamba_ssm``'s fused selective scan against the pure-torch scan (where it imports);
5. prediction time of the 40 Hippocampus validation cases of fold 0 (the planned U-Net at
   random weights: speed does not depend on the weights; synthetic cases of Hippocampus
   size when ``--data`` lacks the dataset, said so).

Without CUDA (or with ``--tiny``) the same checks run on the CPU at tiny sizes, so that the
script cannot rot: the test suite runs it that way.

Carrying it to the device machine: the machine has torch but not MONAI, SimpleITK,
nibabel, batchgenerators or nnunetv2. Download their wheels (and their own requirements
missing there, e.g. ``dynamic-network-architectures``, ``acvl-utils``,
``connected-components-3d``, ``batchgeneratorsv2``) into an ignored ``.whl`` folder as
``/work/.library/device/README.md`` says, carry ``.whl``, install them with
``--target /tmp/site``, and copy ``../shared/data/Dataset004_Hippocampus`` into a carried,
ignored folder given as ``--data`` (it is 16 MB). ``scripts/device_site.sh`` packs the wheels into
one archive that fits a call beside the dataset. The learning comparison belongs in the same lease,
after this script: ``scripts/bench_accuracy.py --data DIR --trainer nnUNetTrainer_5epochs`` (both
tools on the GPU, nnU-Net's split for both, autoseg at nnU-Net's wall-clock budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("Dataset004_Hippocampus", "Dataset027_ACDC")
HIPPOCAMPUS_VALIDATION_CASES = 40  # 200 cases, fold 0 of 5
TINY_PREDICTION_CASES = 3


# ---- children: each measurement in its own process (clean peak memory, a crash stays contained) ----

def tiny_plan(arch):
    """The smallest patch the topology accepts, doubled along the first axis (instance norm needs
    more than one voxel at the bottleneck), batch 1, Swin's narrowest width: the code paths at CPU cost."""
    from autoseg.networks.topology import UNetTopology

    divisor = UNetTopology(arch.patch_size, arch.kernel_sizes, arch.strides, arch.features).divisor()
    arch.patch_size = [2 * divisor[0], *divisor[1:]]
    arch.batch_size = 1
    if "feature_size" in arch.options:
        arch.options["feature_size"] = 12
    return arch


def host_batch(shape_image, classes, device, generator_seed=0):
    import torch

    torch.manual_seed(generator_seed)
    image, target = torch.randn(*shape_image), torch.randint(0, classes, (shape_image[0], *shape_image[2:]))
    if device.type == "cuda":
        image, target = image.pin_memory(), target.pin_memory()
    return image, target


def child_step(spec: dict) -> dict:
    """One architecture's training step: median seconds, peak memory, the memory model's estimate."""
    import torch

    from autoseg.networks.memory import measure
    from autoseg.networks.precision import cuda_autocast_dtype
    from autoseg.networks.registry import ARCHITECTURES, build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.loop import TrainingLoop
    from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
    from autoseg.training.schedule import PolySchedule

    device = torch.device(spec["device"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as autoseg's select_device sets it
    plans = load_plans(REPO / "plans" / f"{spec['dataset']}.json")
    arch = plans.architecture("3d_fullres", spec["arch"])
    if spec["tiny"]:
        arch = tiny_plan(arch)
    channels, classes = plans.num_input_channels, plans.num_segmentation_heads
    voxels = math.prod(arch.patch_size)
    amp = cuda_autocast_dtype(device) if device.type == "cuda" else None
    context = 0
    if device.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)  # the CUDA context and libraries
    network = build_network(arch, channels, classes, 3, True).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    loop = TrainingLoop(network=network, model=network, loss=DeepSupervisionLoss(DiceCELoss()),
                        train_batches=iter(()), val_batches=iter(()), optimizer=optimizer,
                        schedule=PolySchedule(1e-2, 0.9, 1, 1), num_classes=classes, device=device, amp_dtype=amp,
                        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16), progress=False)
    image, target = host_batch((arch.batch_size, channels, *arch.patch_size), classes, device)
    times = []
    warm_up = 0 if spec["tiny"] else 2  # cuDNN autotuning, allocator growth
    for index in range(spec["steps"] + warm_up):
        start = time.perf_counter()
        loop.train_step(image, target)  # returns the loss as a float: the step has finished
        if index >= warm_up:
            times.append(time.perf_counter() - start)
    if spec["tiny"]:
        probe = [2 * p for p in arch.patch_size]
        estimate = measure(lambda: ARCHITECTURES[arch.name].build(arch, channels, classes, 3, True), channels,
                           [min(p, 64) for p in probe]).training_bytes(arch.batch_size, voxels)
    else:
        estimate = arch.estimated_memory_gb * 2**30
    result = {"dataset": spec["dataset"], "arch": arch.name, "patch": arch.patch_size, "batch": arch.batch_size,
              "dtype": str(amp).replace("torch.", "") if amp else "float32", "step_s": statistics.median(times),
              "estimate_gb": estimate / 2**30}
    if device.type == "cuda":
        # Measured again after the steps: cuDNN and cuBLAS load their kernels and handles at the first
        # convolution, outside the caching allocator, and the step's peak holds them too.
        free, total = torch.cuda.mem_get_info(device)
        context = max(context, total - free - torch.cuda.memory_reserved(device))
        peak = torch.cuda.max_memory_reserved(device) + context
        result.update(peak_allocated_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                      context_gb=context / 2**30, peak_gb=peak / 2**30, estimate_over_peak=estimate / peak)
    return result


def nnunet_plans(dataset: str, arch: dict, spacing: list[float]) -> tuple[dict, dict]:
    """nnU-Net's plans and dataset.json for a PlainConvUNet of exactly this patch, batch and topology."""
    stages = len(arch["features"])
    conv = "torch.nn.modules.conv.Conv3d"
    arch_kwargs = {"n_stages": stages, "features_per_stage": arch["features"], "conv_op": conv,
                   "kernel_sizes": arch["kernel_sizes"], "strides": arch["strides"],
                   "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1),
                   "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                   "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": arch["batch_size"], "patch_size": arch["patch_size"],
        "median_image_size_in_voxels": arch["patch_size"], "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    plans = {"dataset_name": dataset, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": spacing,
             "original_median_shape_after_transp": arch["patch_size"], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": configuration}, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager",
             "continue_training": False,  # nnU-Net 2.8's trainer pops this (run_training puts it there)
             "foreground_intensity_properties_per_channel": {"0": {
                 "max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                 "percentile_99_5": 1.0, "std": 1.0}}}
    labels = {"background": 0, **{f"class{k}": k for k in range(1, arch["classes"])}}
    return plans, {"channel_names": {"0": "image"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}


def child_nnunet(spec: dict) -> dict:
    """nnU-Net's own training step (``nnUNetTrainer.train_step``) on the same patch, batch and topology."""
    with tempfile.TemporaryDirectory() as work:
        for root in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[root] = os.path.join(work, root)
        os.environ["nnUNet_compile"] = "f"  # autoseg does not compile either
        # initialize() infers the dataset class from the preprocessed folder's file endings; no data is read.
        data = Path(work, "nnUNet_preprocessed", spec["dataset"], "nnUNetPlans_3d_fullres")
        data.mkdir(parents=True)
        (data / "unused.npz").touch()
        import torch
        import torch.nn.functional as F
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        device = torch.device(spec["device"])
        # nnU-Net's run_training sets these before it builds the trainer; built directly here, so set alike.
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = device.type == "cuda", False
        plans, dataset_json = nnunet_plans(spec["dataset"], spec["arch"], spec["spacing"])
        trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device)
        trainer.initialize()
        arch = spec["arch"]
        image, target = host_batch((arch["batch_size"], 1, *arch["patch_size"]), arch["classes"], device)
        targets = [F.interpolate(target[:, None].float(), scale_factor=tuple(s), mode="nearest-exact")
                   for s in trainer._get_deep_supervision_scales()]
        batch = {"data": image, "target": [t.pin_memory() if device.type == "cuda" else t for t in targets]}
        times, warm_up = [], 0 if spec["tiny"] else 2
        for index in range(spec["steps"] + warm_up):
            start = time.perf_counter()
            trainer.train_step(batch)  # returns the loss as a numpy value: the step has finished
            if index >= warm_up:
                times.append(time.perf_counter() - start)
        return {"step_s": statistics.median(times), "dtype": "float16" if device.type == "cuda" else "float32"}


def run_child(kind: str, spec: dict, python: str = sys.executable, timeout: float = 300) -> dict:
    command = [python, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHILDREN = {"step": child_step, "nnunet": child_nnunet}


# ---- the checks ----------------------------------------------------------------------------------------------

def check_architectures(device: str, tiny: bool, steps: int, only: list[str] | None = None) -> list[dict]:
    from autoseg.planning.plans import load_plans

    rows = []
    for dataset in DATASETS:
        for arch in sorted(load_plans(REPO / "plans" / f"{dataset}.json").configuration("3d_fullres").architectures):
            if only and arch not in only:
                continue
            spec = {"dataset": dataset, "arch": arch, "device": device, "tiny": tiny, "steps": steps}
            # On CUDA each in its own process, for a clean peak; the CPU's tiny steps share one.
            result = guarded(child_step, spec) if tiny else run_child("step", spec)
            rows.append({"dataset": dataset, "arch": arch, **result})
            print(f"  {dataset} {arch}: {result}", file=sys.stderr, flush=True)
    return rows


def check_against_nnunet(device: str, tiny: bool, steps: int, python: str) -> dict:
    from autoseg.planning.plans import load_plans

    probe = subprocess.run([python, "-c", "import nnunetv2"], capture_output=True, text=True)
    if probe.returncode:
        return {"skipped": f"nnunetv2 does not import in {python} (carry its wheels, or give --nnunet-python)"}
    plans = load_plans(REPO / "plans" / "Dataset004_Hippocampus.json")
    plan = plans.architecture("3d_fullres", "unet")
    if tiny:
        plan = tiny_plan(plan)
    arch = {"patch_size": plan.patch_size, "batch_size": plan.batch_size, "features": plan.features,
            "kernel_sizes": plan.kernel_sizes, "strides": plan.strides, "classes": plans.num_segmentation_heads}
    spec = {"dataset": "Dataset004_Hippocampus", "arch": arch, "device": device, "steps": steps, "tiny": tiny,
            "spacing": plans.configuration("3d_fullres").spacing}
    theirs = run_child("nnunet", spec, python)
    ours_spec = {"dataset": "Dataset004_Hippocampus", "arch": "unet", "device": device, "tiny": tiny, "steps": steps}
    ours = guarded(child_step, ours_spec) if tiny else run_child("step", ours_spec)
    if "error" in theirs or "error" in ours:
        return {"error": f"nnU-Net: {theirs.get('error', 'ok')}; autoseg: {ours.get('error', 'ok')}"}
    return {"patch": plan.patch_size, "batch": plan.batch_size, "autoseg_it_s": 1 / ours["step_s"],
            "autoseg_dtype": ours["dtype"], "nnunet_it_s": 1 / theirs["step_s"], "nnunet_dtype": theirs["dtype"],
            "ratio": theirs["step_s"] / ours["step_s"]}


def check_torchrun(device: str, tiny: bool) -> dict:
    """``torchrun`` training of 2 iterations, its validation and the fold's final prediction."""
    import torch

    from autoseg.cli import main as autoseg_main
    from autoseg.dataset.synthetic import make_synthetic_dataset
    from autoseg.planning.plans import load_plans, save_plans
    from autoseg.training.distributed import process_group_backend

    with tempfile.TemporaryDirectory() as work:
        raw = make_synthetic_dataset(Path(work) / "raw", num_cases=6, num_test=0)
        flags = [f"--raw={raw.parent}", f"--preprocessed={work}/pre", f"--results={work}/res"]
        if autoseg_main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-a", "unet", "-np", "2", *flags]):
            return {"error": "plan-and-preprocess failed"}
        if tiny:
            plans_file = Path(work) / "pre" / raw.name / "plans.json"
            plans = load_plans(plans_file)
            tiny_plan(plans.architecture("3d_fullres", "unet"))
            save_plans(plans, plans_file)
        ranks = max(1, min(2, torch.cuda.device_count())) if device == "cuda" else 1
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29761",
                   "-m", "autoseg", "train", "999", "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "2",
                   "--val-iters", "2", "--num-workers", "0", "--seed", "0", "--device", device, *flags]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=work,
                              env=child_env(OMP_NUM_THREADS="2"))
        seconds = time.perf_counter() - start
        summary = Path(work) / "res" / raw.name / "3d_fullres__unet" / "fold_0" / "validation" / "summary.json"
        if proc.returncode or not summary.is_file():
            return {"error": (proc.stderr.strip().splitlines() or ["no validation summary"])[-1][:300]}
        # One rank never wraps the network in DistributedDataParallel: the gradient all-reduce is then unproven.
        return {"ranks": ranks, "backend": process_group_backend(device == "cuda"), "seconds": seconds,
                "validation_summary": True, "ddp": ranks > 1}


def check_mamba_scan(device: str) -> dict:
    import torch

    import autoseg.networks.selective_scan as scan

    if scan._mamba_ssm_scan is None or device != "cuda":
        return {"skipped": "mamba_ssm does not import" if scan._mamba_ssm_scan is None else "no CUDA device"}
    torch.manual_seed(0)
    batch, length, d_inner, d_state = 2, 40 * 56 * 40 // 8, 128, 16  # U-Mamba's bottleneck-sized sequence
    u, delta = torch.randn(batch, length, d_inner, device=device), torch.rand(batch, length, d_inner, device=device)
    A = -torch.rand(d_inner, d_state, device=device)
    B, C = (torch.randn(batch, length, d_state, device=device) for _ in range(2))
    D = torch.randn(d_inner, device=device)

    def timed() -> tuple[torch.Tensor, float]:
        y = scan.selective_scan(u, delta, A, B, C, D)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            y = scan.selective_scan(u, delta, A, B, C, D)
        torch.cuda.synchronize()
        return y, (time.perf_counter() - start) / 5

    fused, fused_s = timed()
    kernel, scan._mamba_ssm_scan = scan._mamba_ssm_scan, None
    try:
        pure, pure_s = timed()
    finally:
        scan._mamba_ssm_scan = kernel
    return {"length": length, "fused_ms": 1e3 * fused_s, "pure_torch_ms": 1e3 * pure_s, "ratio": pure_s / fused_s,
            "max_abs_difference": float((fused - pure).abs().max())}


def check_prediction(device: str, tiny: bool, data: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from autoseg.inference.folder import predict_folder
    from autoseg.inference.model import TrainedModel
    from autoseg.inference.predictor import PredictionSettings
    from autoseg.networks.registry import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.distributed import select_device
    from autoseg.training.splits import make_splits

    plans = load_plans(REPO / "plans" / "Dataset004_Hippocampus.json")
    plan = plans.architecture("3d_fullres", "unet")
    if tiny:
        tiny_plan(plan)
    torch_device = select_device(device)  # as `autoseg predict` does: on CUDA, cuDNN's autotuner on
    network = build_network(plan, plans.num_input_channels, plans.num_segmentation_heads, 3, True)
    model = TrainedModel(plans, "3d_fullres", "unet", [network.to(torch_device).eval()], ["0"])
    count = TINY_PREDICTION_CASES if tiny else HIPPOCAMPUS_VALIDATION_CASES
    # Absolute: the cases are linked from a temporary folder (a relative --data left 40 dangling links on the H200)
    dataset = data.resolve() / "Dataset004_Hippocampus" / "imagesTr"
    with tempfile.TemporaryDirectory() as work:
        inputs = Path(work) / "in"
        inputs.mkdir()
        if dataset.is_dir():
            cases = sorted(p.name[: -len("_0000.nii.gz")] for p in dataset.glob("*_0000.nii.gz"))
            validation = make_splits(cases)[0]["val"][:count]
            for case in validation:
                (inputs / f"{case}_0000.nii.gz").symlink_to(dataset / f"{case}_0000.nii.gz")
            source = f"{len(validation)} validation cases of fold 0 from {dataset.parent}"
        else:
            generator = np.random.default_rng(0)
            # Hippocampus sizes (31-43 x 40-59 x 24-47 at 1 mm); at tiny sizes a quarter along each axis, since
            # the tiny plan's 16x8x8 window would need ~250 windows x 8 flips a case there.
            ranges = ((6, 12), (10, 15), (8, 11)) if tiny else ((24, 48), (40, 60), (31, 44))
            for index in range(count):
                shape = tuple(int(generator.integers(low, high)) for low, high in ranges)
                image = sitk.GetImageFromArray(generator.normal(100, 30, shape).astype(np.float32))
                sitk.WriteImage(image, str(inputs / f"case{index:03d}_0000.nii.gz"))
            size = "a quarter of Hippocampus's size along each axis" if tiny else "Hippocampus size"
            source = f"{count} synthetic cases of {size} ({dataset.parent} is missing)"
        # One case first, untimed: the process's first convolutions load cuDNN and autotune, which a
        # folder of cases pays once and the timed run should not.
        warm = Path(work) / "warm"
        warm.mkdir()
        first = sorted(inputs.iterdir())[0]
        (warm / first.name).symlink_to(first.resolve())
        predict_folder(model, warm, Path(work) / "warm_out", PredictionSettings(), torch_device, progress=False)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = predict_folder(model, inputs, Path(work) / "out", PredictionSettings(), torch_device, progress=False)
        seconds = time.perf_counter() - start
    if result.failed:  # a case that failed is a failed check, not a faster one
        return {"error": f"{len(result.failed)} of {count} cases failed, the first: {result.failed[0]}"}
    return {"cases": len(result.written), "failed": 0, "seconds": seconds, "source": source, "mirroring": True}


# ---- the table ----------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    lines = [f"device: {report['device']}  torch {report['torch']}  ({'tiny CPU sizes' if report['tiny'] else 'planned sizes'})",
             f"{'check':<11} {'item':<34} {'measured':<34} {'reference':<24} {'ratio':>6}",
             "-" * 113]

    def row(check, item, measured, reference="", ratio=None):
        lines.append(f"{check:<11} {item:<34} {measured:<34} {reference:<24} "
                     f"{'' if ratio is None else f'{ratio:6.2f}'}")

    for r in report["architectures"]:
        item = f"{r['dataset'].split('_')[1][:11]} {r['arch']} {'x'.join(map(str, r.get('patch', [])))} b{r.get('batch', '')}"
        if "error" in r:
            row("step", item, "failed: " + r["error"][:60])
        elif "peak_gb" in r:
            row("step", item, f"{r['step_s'] * 1e3:.0f} ms {r['dtype']}, peak {r['peak_gb']:.2f} GB",
                f"model {r['estimate_gb']:.2f} GB", r["estimate_over_peak"])
        else:
            row("step", item, f"{r['step_s'] * 1e3:.0f} ms {r['dtype']}", f"model {r['estimate_gb']:.2f} GB (CUDA)")
    n = report["nnunet"]
    if "ratio" in n:
        row("vs nnU-Net", f"unet {'x'.join(map(str, n['patch']))} b{n['batch']}",
            f"{n['autoseg_it_s']:.2f} it/s {n['autoseg_dtype']}", f"{n['nnunet_it_s']:.2f} it/s {n['nnunet_dtype']}",
            n["ratio"])
    else:
        row("vs nnU-Net", "unet", n.get("skipped") or "failed: " + n.get("error", "?")[:80])
    t = report["torchrun"]
    ddp = "DDP" if t.get("ddp") else "no DDP (1 rank)"
    row("torchrun", f"{t.get('ranks', '?')} rank(s), {t.get('backend', '?')}, {ddp}"[:34],
        f"train+validation {t['seconds']:.1f} s" if "seconds" in t else "failed: " + t.get("error", "?")[:80])
    m = report["mamba_scan"]
    if "ratio" in m:
        row("mamba scan", f"L={m['length']}", f"fused {m['fused_ms']:.1f} ms (diff {m['max_abs_difference']:.1e})",
            f"pure torch {m['pure_torch_ms']:.1f} ms", m["ratio"])
    else:
        row("mamba scan", "", "skipped: " + m.get("skipped", "?"))
    p = report["prediction"]
    row("predict", p.get("source", "")[:34], f"{p['cases']} cases in {p['seconds']:.1f} s, TTA" if "seconds" in p
        else "failed: " + p.get("error", "?")[:80])
    return "\n".join(lines)


def guarded(function, *args) -> dict:
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def write_json(report: dict, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=1))
    temporary.replace(path)  # atomic: a killed run leaves no half-written JSON


def main() -> int:
    if "--child" in sys.argv:
        kind, payload = sys.argv[sys.argv.index("--child") + 1:][:2]
        print(json.dumps(CHILDREN[kind](json.loads(payload))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("device_check.json"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized checks even where CUDA is available")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per architecture (after 2 warm-up)")
    parser.add_argument("--nnunet-python", default=sys.executable, help="a Python in which nnunetv2 imports")
    parser.add_argument("--architectures", nargs="+", metavar="NAME",
                        help="step only these (each costs ~25 s on an H200, mostly its process's CUDA start)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu" if tiny else "cuda"
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "torch": torch.__version__,
              "tiny": tiny}

    def record(key, value):
        # Each check is written out as it ends, so that a run killed at its time limit still leaves
        # the checks it finished (the device lease is short; a rerun costs minutes).
        report[key] = value
        print(f"[{time.perf_counter() - start:5.0f} s] {key}: {json.dumps(value)[:600]}", flush=True)
        write_json(report, args.json)

    record("architectures", check_architectures(device, tiny, 1 if tiny else args.steps, args.architectures))
    record("nnunet", guarded(check_against_nnunet, device, tiny, 1 if tiny else args.steps, args.nnunet_python))
    record("torchrun", guarded(check_torchrun, device, tiny))
    record("mamba_scan", guarded(check_mamba_scan, device))
    record("prediction", guarded(check_prediction, device, tiny, args.data))
    report["seconds"] = time.perf_counter() - start
    print(table(report))
    print(f"{report['seconds']:.0f} s in all; JSON: {args.json}")
    write_json(report, args.json)
    failed = [r for r in report["architectures"] if "error" in r] + [
        report[k] for k in ("nnunet", "torchrun", "mamba_scan", "prediction") if "error" in report[k]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
