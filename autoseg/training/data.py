"""Training batches: random patches from memory-mapped cases, foreground oversampling, augmentation.

A third of every batch is centred on a voxel of a randomly chosen present class (the
locations were sampled at preprocessing), so that small structures are seen often
enough; the rest are uniform. Patches are drawn 20% larger than the network patch so
that rotation and scaling have real context, and the spatial transform crops the
centre back to the patch. Augmentation is batchgenerators', with nnU-Net's
probabilities. All randomness comes from numpy's global generator, which is seeded per
worker and saved in checkpoints (for an exactly repeatable run with 0 workers).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autoseg.errors import AutosegError
from autoseg.preprocessing.store import (ANNOTATED, OUTSIDE_NONZERO, check_training_case, load_arrays,
                                         load_properties)
from autoseg.training.workers import PREFETCH

FOREGROUND_FRACTION = 0.33
OPEN_CASES = 128  # memory-mapped cases kept open per process (see PatchSampler.arrays)
CONTEXT = 1.2  # drawn patch / network patch, for augmentation


def augmentation(patch_size: list[int], anisotropic_axis: int | None = None, seg_fill: int = 0) -> Compose:
    """nnU-Net's augmentation, images interpolated linearly as nnU-Net v2 does since 2.5 (batchgeneratorsv2's
    grid_sample and trilinear upsampling; labels nearest): the cubic spline of batchgenerators' defaults made an ACDC batch
    2.5x and a 128^3 one 1.8x slower to augment than nnU-Net's on one core (``scripts/bench_augmentation.py``),
    and on a GPU augmentation sets the pace. A 3D patch with a much coarser ``anisotropic_axis`` gets
    nnU-Net's "dummy 2D" spatial transform: each slice across that axis is rotated (any
    angle) and scaled in-plane, nothing is interpolated along the coarse axis. Rotation: ±30
    degrees in 3D, any angle in 2D, ±15 degrees for elongated 2D patches (sides over 1.5:1). ``seg_fill``:
    the label of what rotation brings in from outside the drawn patch."""
    dims = len(patch_size)
    in_plane_only = dims == 3 and anisotropic_axis is not None
    spatial_patch = [p for a, p in enumerate(patch_size) if not in_plane_only or a != anisotropic_axis]
    rotation = (-math.pi / 6, math.pi / 6) if len(spatial_patch) == 3 else (-math.pi, math.pi)
    if dims == 2 and max(patch_size) / min(patch_size) > 1.5:
        # nnU-Net's rule for elongated 2D patches: a 512x256 patch turned by 90 degrees would sample mostly
        # the zero fill outside the drawn region, so ±15 degrees.
        rotation = (-math.pi / 12, math.pi / 12)
    spatial = SpatialTransform(spatial_patch, patch_center_dist_from_border=None, do_elastic_deform=False,
                               do_rotation=True, angle_x=rotation, angle_y=rotation, angle_z=rotation, p_rot_per_axis=1,
                               do_scale=True, scale=(0.7, 1.4), border_mode_data="constant", border_cval_data=0,
                               order_data=1, border_mode_seg="constant", border_cval_seg=seg_fill, order_seg=0,
                               random_crop=False, p_el_per_sample=0, p_scale_per_sample=0.2, p_rot_per_sample=0.2)
    return Compose([
        SliceWise(spatial, anisotropic_axis) if in_plane_only else spatial,
        GaussianNoiseTransform(p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
        BrightnessMultiplicativeTransform((0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5, order_downsample=0,
                                       order_upsample=1, p_per_sample=0.25,
                                       ignore_axes=(anisotropic_axis,) if in_plane_only else None),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
        MirrorTransform(axes=tuple(range(dims))),
    ])


class SliceWise(AbstractTransform):
    """Applies a 2D transform to every slice across ``axis`` of 3D batches (slices folded into channels)."""

    def __init__(self, transform: AbstractTransform, axis: int):
        self.transform, self.axis = transform, axis

    def __call__(self, **data):
        folded, shapes = {}, {}
        for key in ("data", "seg"):
            array = np.moveaxis(data[key], self.axis + 2, 2)
            shapes[key] = array.shape
            folded[key] = array.reshape(array.shape[0], -1, *array.shape[3:])
        out = self.transform(**folded)
        for key in ("data", "seg"):
            b, c, n = shapes[key][:3]
            data[key] = np.moveaxis(out[key].reshape(b, c, n, *out[key].shape[2:]), 2, self.axis + 2)
        return data


class PatchSampler:
    """Draws batches ``(image (B, C, *patch), seg (B, *patch))`` from preprocessed cases."""

    def __init__(self, folder: Path, case_ids: list[str], patch_size: list[int], batch_size: int,
                 augment: bool, anisotropic_axis: int | None = None, plans_digest: str | None = None,
                 place_in_batch: tuple[int, int] | None = None, masked_channels: tuple[int, ...] = ()):
        """``place_in_batch``: (index of this process's first sample, samples of all processes) under
        torchrun, where the ranks' batches together are the step's batch and a third of that is forced.
        ``masked_channels``: channels normalised inside the non-zero region (``zscore_mask``), zero outside
        it; augmentation (noise, gamma, contrast) would make that zero something the network never sees in
        a case to predict, so they are zeroed there again afterwards (nnU-Net's MaskImageTransform)."""
        self.folder, self.case_ids = Path(folder), list(case_ids)
        self.masked_channels = list(masked_channels)
        self.first_sample, self.global_batch = place_in_batch or (0, batch_size)
        self.patch_size, self.batch_size, self.dims = list(patch_size), batch_size, len(patch_size)
        self.draw_size = [int(math.ceil(p * CONTEXT)) for p in patch_size] if augment else list(patch_size)
        if augment and self.dims == 3 and anisotropic_axis is not None:
            self.draw_size[anisotropic_axis] = patch_size[anisotropic_axis]  # never resampled along it
        # With masked channels, what lies beyond the image (padding, corners rotated in) is outside the
        # non-zero region too, as in nnU-Net, whose loader pads its segmentation with -1.
        self.seg_fill = OUTSIDE_NONZERO if self.masked_channels else 0
        self.transform = augmentation(self.patch_size, anisotropic_axis, self.seg_fill) if augment else None
        self.properties = {c: load_properties(self.folder, c) for c in self.case_ids}
        for properties in self.properties.values():
            check_training_case(self.folder, properties, plans_digest)
            # As int32 arrays, not JSON's lists of Python ints: about 10x less memory (1200 cases of
            # 117 classes held some 140 M small lists), and loader workers, forked, share the pages
            # instead of copying them as reference counts are touched.
            properties.class_locations = {key: np.asarray(points, dtype=np.int32).reshape(-1, 3)
                                          for key, points in properties.class_locations.items()}
        self._arrays: OrderedDict[str, tuple] = OrderedDict()

    def arrays(self, case_id: str):
        """The case's memory maps: opening is cheap, reading happens per patch. The most recently used
        ``OPEN_CASES`` stay open: each holds two file descriptors, and a worker that kept every case of a
        1200-case dataset open passed the usual limit of 1024 ("Too many open files")."""
        if case_id in self._arrays:
            self._arrays.move_to_end(case_id)
        else:
            self._arrays[case_id] = load_arrays(self.folder, case_id)
            while len(self._arrays) > OPEN_CASES:
                self._arrays.popitem(last=False)
        return self._arrays[case_id]

    def _patch(self, case_id: str, force_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        image, seg = self.arrays(case_id)
        locations = self.properties[case_id].class_locations
        present = [points for key, points in locations.items() if key != ANNOTATED and len(points)]
        shape = list(seg.shape)
        centre = None
        if force_foreground and present:  # a random present class, then a random voxel of it
            points = present[np.random.randint(len(present))]
            centre = points[np.random.randint(len(points))]
        elif len(locations.get(ANNOTATED, ())):  # a sparsely annotated case: somewhere annotated (nnU-Net)
            points = locations[ANNOTATED]
            centre = points[np.random.randint(len(points))]
        if self.dims == 2:  # a slice along axis 0, then a 2D patch in it
            z = centre[0] if centre is not None else np.random.randint(shape[0])
            window = [(z, z + 1)] + self._window(shape[1:], None if centre is None else centre[1:])
        else:
            window = self._window(shape, centre)
        image_patch = extract_window(image, window, 0.0)
        seg_patch = extract_window(seg, window, self.seg_fill)
        if self.dims == 2:
            image_patch, seg_patch = image_patch[:, 0], seg_patch[0]
        return image_patch, seg_patch

    def _window(self, shape: list[int], centre) -> list[tuple[int, int]]:
        window = []
        for axis, size in enumerate(self.draw_size):
            # Placed by the network patch, the centre of the drawn one (the spatial transform crops
            # it back to that centre): starts that keep as much of the image in it as possible (all
            # of it where the patch is larger: the rest is padding on both sides).
            patch = self.patch_size[axis]
            low, high = min(0, shape[axis] - patch), max(0, shape[axis] - patch)
            if centre is not None:  # centred on the voxel, moved inwards as far as that range asks
                patch_start = int(np.clip(int(centre[axis]) - patch // 2, low, high))
            else:
                patch_start = np.random.randint(low, high + 1)
            start = patch_start - (size - patch) // 2
            window.append((start, start + size))
        return window

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, segs = [], []
        for index in range(self.batch_size):
            case_id = self.case_ids[np.random.randint(len(self.case_ids))]
            force = forced_foreground(self.first_sample + index, self.global_batch)
            image, seg = self._patch(case_id, force_foreground=force)
            images.append(image)
            segs.append(seg)
        data = {"data": np.stack(images).astype(np.float32), "seg": np.stack(segs)[:, None].astype(np.float32)}
        if self.transform is not None:
            data = self.transform(**data)
        else:
            data["data"], data["seg"] = _centre_crop(data["data"], self.patch_size), _centre_crop(data["seg"], self.patch_size)
        outside = data["seg"] == OUTSIDE_NONZERO  # (B, 1, *patch): moved with the labels by the spatial transform
        if outside.any():
            for channel in self.masked_channels:
                data["data"][:, channel][outside[:, 0]] = 0.0
            data["seg"][outside] = 0  # background to the loss
        return torch.from_numpy(np.ascontiguousarray(data["data"], np.float32)), \
            torch.from_numpy(np.rint(data["seg"][:, 0]).astype(np.int64))


def forced_foreground(index: int, batch_size: int) -> bool:
    """Whether sample ``index`` of a step's batch is centred on a foreground voxel: the last third of the
    batch, as nnU-Net places them (7 -> 2, 2 -> 1); a batch of one (nnU-Net: never) a third of the time."""
    forced = round(batch_size * FOREGROUND_FRACTION)
    if forced == 0:
        return bool(np.random.random() < FOREGROUND_FRACTION)
    return index >= batch_size - forced


def extract_window(array: np.ndarray, window: list[tuple[int, int]], fill) -> np.ndarray:
    """``array[..., window]`` with out-of-bounds parts filled (patches may exceed small images)."""
    spatial = array.shape[-len(window):]
    lead = array.shape[: array.ndim - len(window)]
    out = np.full((*lead, *[hi - lo for lo, hi in window]), fill, dtype=array.dtype)
    src, dst = [], []
    for (lo, hi), size in zip(window, spatial):
        a, b = max(lo, 0), min(hi, size)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def _centre_crop(array: np.ndarray, patch: list[int]) -> np.ndarray:
    spatial = array.shape[2:]
    slices = [slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, patch)]
    return array[(slice(None), slice(None), *slices)]


class _BatchStream(IterableDataset):
    def __init__(self, sampler: PatchSampler, seed: int):
        self.sampler, self.seed = sampler, seed

    def __iter__(self):
        info = get_worker_info()
        if info is not None:  # each worker its own stream; torch is kept to one thread there
            np.random.seed(worker_seed(self.seed, info.id))
            torch.set_num_threads(1)
        while True:
            try:
                yield self.sampler.batch()
            except AutosegError as exc:
                # Sent as data: raised by the DataLoader, it would reach the user wrapped in the worker's traceback.
                yield exc
                return


def worker_seed(seed: int, worker: int) -> int:
    """The numpy seed of loader worker ``worker`` of a stream seeded ``seed``. Hashed, not added: a run
    continued at epoch e starts its stream at ``seed + 7919 e``, and a sum would hand worker k the seed
    that worker k + e had at the start, replaying its patches and augmentations."""
    return int(np.random.SeedSequence([seed % 2**63, worker]).generate_state(1)[0])


def batch_iterator(sampler: PatchSampler, num_workers: int, seed: int, pin_memory: bool = False):
    """An endless iterator of batches; with workers, batches are made in background processes.
    ``pin_memory``: for a CUDA device only (page-locked buffers start a CUDA context in the process)."""
    if num_workers == 0:
        while True:
            yield sampler.batch()
    loader = DataLoader(_BatchStream(sampler, seed), batch_size=None, num_workers=num_workers,
                        persistent_workers=True, prefetch_factor=PREFETCH, pin_memory=pin_memory)
    for batch in loader:
        if isinstance(batch, AutosegError):
            raise batch
        yield batch
