import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.errors import ImageReadError
from autoseg.io.images import read_header, read_image, read_label, write_label
from tests.conftest import write_nifti

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def test_label_round_trip_keeps_geometry_and_values(tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, (7, 9, 11)).astype(np.uint8)
    source = write_nifti(tmp_path / "in.nii.gz", labels, (0.7, 0.8, 3.0), (5.0, -3.0, 12.0), ROTATED)
    array, geometry = read_label(source)
    assert array.shape == (7, 9, 11) and geometry.array_spacing == pytest.approx([3.0, 0.8, 0.7])
    write_label(array, tmp_path / "out.nii.gz", geometry, reference_file=source)
    back, back_geometry = read_label(tmp_path / "out.nii.gz")
    assert np.array_equal(back, labels)
    assert back_geometry == geometry
    ref, out = nib.load(str(source)), nib.load(str(tmp_path / "out.nii.gz"))
    assert np.array_equal(ref.affine, out.affine)
    assert int(ref.header["qform_code"]) == int(out.header["qform_code"])
    assert int(ref.header["sform_code"]) == int(out.header["sform_code"])


def test_rgb_png_reads_as_three_channels_of_a_2d_image(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (20, 30, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "x.png"))
    array, geometry = read_image(tmp_path / "x.png")
    assert array.shape == (3, 1, 20, 30)
    assert np.array_equal(array[1, 0], rgb[..., 1])
    assert geometry.dimension == 2 and geometry.array_spacing == [999.0, 1.0, 1.0]


@pytest.mark.parametrize("content, problem", [
    (b"", "file is empty"),
    (b"this is not an image at all" * 20, "cannot be read as an image"),
])
def test_unreadable_files_are_refused_with_the_file_named(tmp_path, content, problem):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=problem) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_refused(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.nii.gz"):
        read_image(tmp_path / "cut.nii.gz")


def test_directory_named_like_an_image_is_refused(tmp_path):
    (tmp_path / "case.nii.gz").mkdir()
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path / "case.nii.gz")


def test_enormous_header_is_refused_before_reading_pixels(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 64  # a header, and almost no pixels
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ImageReadError, match="claims size"):
        read_header(tmp_path / "huge.nii.gz")


def test_non_orthonormal_direction_and_4d_are_refused(tmp_path):
    skewed = np.eye(4)
    skewed[0, 1] = 0.9
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), skewed), str(tmp_path / "skew.nii.gz"))
    with pytest.raises(ImageReadError, match="orthonormal"):
        read_header(tmp_path / "skew.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(ImageReadError, match="4 dimensions"):
        read_header(tmp_path / "four.nii.gz")


def test_non_integer_labels_are_refused(tmp_path):
    path = write_nifti(tmp_path / "l.nii.gz", np.full((3, 3, 3), 0.5, np.float32))
    with pytest.raises(ImageReadError, match="non-integer"):
        read_label(path)
