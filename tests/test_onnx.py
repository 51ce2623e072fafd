"""export --onnx and predict --engine onnxruntime: the same sliding window, the same labels."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg.cli import main
from autoseg.errors import UsageError

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'autoseg[onnx]')")


@pytest.fixture(scope="module")
def onnx_package(pipeline, tmp_path_factory):
    target = tmp_path_factory.mktemp("onnx") / "model_onnx.zip"
    assert main(["export", "-d", "999", "-c", "3d_fullres", "-f", "0", "--onnx", "-o", str(target),
                 *pipeline.flags]) == 0
    return target


def test_onnx_network_gives_the_torch_logits_on_random_windows(pipeline, onnx_package, tmp_path):
    from autoseg.inference.model import load_trained_model
    from autoseg.inference.onnx import OnnxNetwork

    with zipfile.ZipFile(onnx_package) as archive:
        manifest = json.loads(archive.read("model.json"))
        archive.extract("models/3d_fullres__unet/fold_0/network.onnx", tmp_path)
    assert manifest["onnx_opset"] == 17
    model = load_trained_model(pipeline.fold.parent, ["0"], "3d_fullres", "unet", torch.device("cpu"))
    patch = model.plans.architecture("3d_fullres").patch_size
    session = OnnxNetwork(tmp_path / "models/3d_fullres__unet/fold_0/network.onnx")
    torch.manual_seed(0)
    for batch in (1, 3):  # the batch axis is dynamic: windows x mirror flips per call
        x = torch.randn(batch, 1, *patch) * 2
        with torch.inference_mode():
            expected = model.networks[0](x)
        assert (session(x) - expected).abs().max().item() < 1e-3


def test_predict_with_onnxruntime_writes_the_torch_labels(pipeline, onnx_package, tmp_path):
    flags = ["-i", str(pipeline.dataset / "imagesTs"), "--fp32", "--disable-tta"]
    assert main(["predict", "-m", str(onnx_package), "-o", str(tmp_path / "torch"), *flags]) == 0
    assert main(["predict", "-m", str(onnx_package), "-o", str(tmp_path / "onnx"), "--engine", "onnxruntime",
                 *flags]) == 0
    files = sorted((tmp_path / "torch").glob("*.nii.gz"))
    assert len(files) == 2
    for file in files:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / file.name))) for d in (tmp_path / "torch", tmp_path / "onnx"))
        assert np.array_equal(a, b)


def test_architectures_that_do_not_export_say_so_and_onnx_needs_the_package(pipeline, tmp_path, capsys):
    from autoseg.inference.onnx import export_onnx_members

    with pytest.raises(UsageError, match="'swin_unetr' does not export to ONNX"):
        export_onnx_members({}, "models/3d_fullres__swin_unetr", "3d_fullres", "swin_unetr", ["0"])
    package = tmp_path / "plain.zip"
    assert main(["export", "-d", "999", "-c", "3d_fullres", "-f", "0", "-o", str(package), *pipeline.flags]) == 0
    assert main(["predict", "-m", str(package), "-i", str(pipeline.dataset / "imagesTs"), "-o", str(tmp_path / "o"),
                 "--engine", "onnxruntime"]) == 2
    assert "export the package with --onnx" in capsys.readouterr().err
