import json

import nibabel as nib
import numpy as np
import pytest

from autoseg.dataset.check import check_dataset
from autoseg.dataset.msd import convert_msd
from autoseg.errors import DatasetError


def _msd_task(root, channels=2):
    task = root / "Task07_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    rng = np.random.default_rng(0)
    training = []
    for name in ("toy_001", "toy_002"):
        image = rng.random((12, 10, 6, channels)).astype(np.float32)
        label = (image[..., 0] > 0.7).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), str(task / "imagesTr" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(task / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    nib.save(nib.Nifti1Image(rng.random((12, 10, 6, channels)).astype(np.float32), affine),
             str(task / "imagesTs" / "toy_009.nii.gz"))
    (task / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": {str(i): f"MR{i}" for i in range(channels)},
        "labels": {"0": "background", "1": "blob"}, "training": training, "test": ["./imagesTs/toy_009.nii.gz"]}))
    return task


def test_msd_task_is_split_into_channels_with_geometry_kept(tmp_path):
    task = _msd_task(tmp_path)
    target = convert_msd(task, tmp_path / "raw")
    assert target.name == "Dataset007_Toy"
    meta = json.loads((target / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR0", "1": "MR1"} and meta["labels"] == {"background": 0, "blob": 1}
    source = nib.load(str(task / "imagesTr" / "toy_001.nii.gz"))
    channel = nib.load(str(target / "imagesTr" / "toy_001_0001.nii.gz"))
    assert np.array_equal(np.asarray(channel.dataobj), np.asarray(source.dataobj)[..., 1])
    assert np.allclose(channel.affine, source.affine)
    assert (target / "imagesTs" / "toy_009_0001.nii.gz").exists()
    assert check_dataset(target, num_processes=1, progress=False) == []


def test_msd_path_escaping_the_task_folder_is_refused(tmp_path):
    task = _msd_task(tmp_path)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"][0]["image"] = "../../etc/passwd"
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        convert_msd(task, tmp_path / "raw")
    assert not (tmp_path / "raw" / "Dataset007_Toy").exists()


def test_an_msd_entry_without_its_label_is_named_and_leaves_nothing_half_converted(tmp_path):
    from autoseg.errors import UsageError

    task = _msd_task(tmp_path)
    meta = json.loads((task / "dataset.json").read_text())
    del meta["training"][1]["label"]
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="each 'training' entry needs \"image\" and \"label\""):
        convert_msd(task, tmp_path / "raw")
    assert not list((tmp_path / "raw").iterdir())  # the half-converted folder is gone too
    with pytest.raises(UsageError, match="ids are 0 to 999"):
        convert_msd(_msd_task(tmp_path / "again"), tmp_path / "raw", dataset_id=-1)
