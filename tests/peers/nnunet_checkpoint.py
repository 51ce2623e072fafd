"""Run with the peers venv's python (nnunetv2 installed): writes a real nnU-Net v2 checkpoint and its logits.

    /tmp/peers-venv/bin/python tests/peers/nnunet_checkpoint.py OUT_DIR {PlainConvUNet,ResidualEncoderUNet} [anisotropic]

nnU-Net's own ``nnUNetTrainer`` builds the network from a small plan and writes
``checkpoint_final.pth`` with its ``save_checkpoint`` (the exact file a user has), after every
parameter was set to random values (nnU-Net initialises biases to 0, which would hide a bias
that the mapping drops). ``input.npy`` and ``logits.npy`` are one patch and nnU-Net's
full-resolution logits for it, in eval mode. ``arch.json`` is the architecture the plan used.
``anisotropic`` gives the first two stages 1x3x3 kernels and the last a 3x1x1 one (as ACDC's
plan: neighbouring stages with different kernels, where a decoder could pick the wrong one).
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch

out, kind = sys.argv[1], sys.argv[2]
anisotropic = sys.argv[3:] == ["anisotropic"]
work = tempfile.mkdtemp()
for root in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[root] = os.path.join(work, root)

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

arch_kwargs = {"n_stages": 4, "features_per_stage": [4, 8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
               "kernel_sizes": ([[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 1, 1]] if anisotropic else [[3, 3, 3]] * 4), "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
               "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
               "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
               "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
if kind == "PlainConvUNet":
    arch_kwargs.update(n_conv_per_stage=[2, 2, 2, 2], n_conv_per_stage_decoder=[2, 2, 2])
    class_name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
else:
    arch_kwargs.update(n_blocks_per_stage=[1, 3, 4, 6], n_conv_per_stage_decoder=[1, 1, 1])
    class_name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
patch = [16, 32, 32]
plans = {
    "dataset_name": "Dataset998_Peer", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": patch,
    "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": class_name, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}},
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {}, "continue_training": False,
}
dataset_json = {"channel_names": {"0": "MRI", "1": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
                "numTraining": 10, "file_ending": ".nii.gz"}
trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module  # noqa: E402

trainer_module.infer_dataset_class = lambda folder: None  # no preprocessed data: only the network is wanted
trainer.initialize()
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for parameter in trainer.network.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
for epoch in range(2):  # a logged history with numpy scalars, as a trained model has
    trainer.logger.log("mean_fg_dice", np.float64(0.5 + epoch / 10), epoch)
    trainer.logger.log("ema_fg_dice", np.float64(0.5), epoch)
    trainer.logger.log("train_losses", np.float64(-0.5), epoch)
    trainer.logger.log("val_losses", np.float64(-0.4), epoch)
    trainer.logger.log("lrs", 0.01, epoch)
    trainer.logger.log("dice_per_class_or_region", [np.float64(0.4), np.float64(0.6)], epoch)
    trainer.logger.log("epoch_start_timestamps", 1.0, epoch)
    trainer.logger.log("epoch_end_timestamps", 2.0, epoch)
trainer._best_ema = np.float64(0.55)
os.makedirs(out, exist_ok=True)
trainer.save_checkpoint(os.path.join(out, "checkpoint_final.pth"))
x = torch.randn([1, 2] + patch, generator=generator)
trainer.network.eval()
with torch.no_grad():
    logits = trainer.network(x)
logits = logits[0] if isinstance(logits, (list, tuple)) else logits
np.save(os.path.join(out, "input.npy"), x.numpy())
np.save(os.path.join(out, "logits.npy"), logits.numpy())
json.dump({"class": kind, "patch": patch, **{k: v for k, v in arch_kwargs.items() if not k.endswith("_op")}},
          open(os.path.join(out, "arch.json"), "w"))
