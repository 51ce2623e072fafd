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


def test_a_nifti_gzipped_in_several_members_is_read_and_still_refused_when_cut(tmp_path):
    voxels = np.random.default_rng(5).random((20, 20, 20)).astype(np.float32)
    raw = gzip.decompress(write_nifti(tmp_path / "one.nii.gz", voxels).read_bytes())
    # two gzip members, as bgzip writes them: the trailer's size covers the last one only
    members = gzip.compress(raw[:10000]) + gzip.compress(raw[10000:])
    (tmp_path / "two.nii.gz").write_bytes(members)
    assert np.array_equal(read_image(tmp_path / "two.nii.gz")[0][0], voxels)
    (tmp_path / "cut.nii.gz").write_bytes(members[: len(members) - 5000])
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


def test_a_nifti_with_a_time_axis_of_one_point_reads_as_its_3d_image(tmp_path):
    # (x, y, z, 1): many exporters write a 3D image so; SimpleITK folds the axis away, nibabel keeps it
    data = np.random.default_rng(2).normal(size=(4, 6, 5, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.7, 2.0, 1.0])), str(tmp_path / "t.nii.gz"))
    array, geometry = read_image(tmp_path / "t.nii.gz")
    assert array.shape == (1, 5, 6, 4) and geometry.shape == [5, 6, 4]
    assert np.array_equal(array[0], data[..., 0].transpose(2, 1, 0))
    # (x, y, z, 1, c): a vector image, its c components the channels
    vector = np.random.default_rng(3).normal(size=(4, 6, 5, 1, 2)).astype(np.float32)
    image = nib.Nifti1Image(vector, np.eye(4))
    image.header.set_intent("vector")
    nib.save(image, str(tmp_path / "v.nii.gz"))
    array, _ = read_image(tmp_path / "v.nii.gz")
    assert array.shape == (2, 5, 6, 4)
    assert np.array_equal(array[1], vector[..., 0, 1].transpose(2, 1, 0))
    # A label map written over a vector image's header is a plain scalar map: ITK reads one component back.
    _, geometry = read_image(tmp_path / "v.nii.gz")
    write_label(np.ones((5, 6, 4), np.uint8), tmp_path / "v_label.nii.gz", geometry, reference_file=tmp_path / "v.nii.gz")
    assert int(nib.load(str(tmp_path / "v_label.nii.gz")).header["intent_code"]) == 0
    assert sitk.ReadImage(str(tmp_path / "v_label.nii.gz")).GetNumberOfComponentsPerPixel() == 1


def test_nifti2_is_refused_by_name_extra_bytes_after_the_voxels_pass_and_a_cut_file_is_refused(tmp_path):
    data = np.random.default_rng(8).normal(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti2Image(data, np.diag([0.5, 0.7, 2.0, 1.0])), str(tmp_path / "two.nii.gz"))
    with pytest.raises(ImageReadError, match=r"two\.nii\.gz: is NIfTI-2, which SimpleITK's reader"):
        read_image(tmp_path / "two.nii.gz")  # ITK alone says only "Unable to determine ImageIO reader"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.7, 2.0, 1.0])), str(tmp_path / "one.nii.gz"))
    array, geometry = read_image(tmp_path / "one.nii.gz")
    raw = gzip.decompress((tmp_path / "one.nii.gz").read_bytes())
    (tmp_path / "padded.nii.gz").write_bytes(gzip.compress(raw + bytes(16)))  # readers ignore trailing bytes
    assert np.array_equal(read_image(tmp_path / "padded.nii.gz")[0], array)
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:-40]))  # a whole gzip stream, 10 voxels short
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz: is truncated or corrupt"):
        read_image(tmp_path / "cut.nii.gz")


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_a_header_and_pixel_file_pair_is_written_under_final_names(tmp_path, ending):
    labels = np.random.default_rng(4).integers(0, 3, (4, 5, 6)).astype(np.int16)
    _, geometry = read_label(write_nifti(tmp_path / "ref.nii.gz", labels, (0.7, 0.8, 3.0)))
    out = tmp_path / "out"
    write_label(labels, out / f"case{ending}", geometry)
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and f"case{ending}" in written and all(name.startswith("case") for name in written)
    header = (out / f"case{ending}").read_text(errors="replace")
    pixel_file = next(name for name in written if name != f"case{ending}")
    assert pixel_file in header  # the header names the pixel file by its final name, not a temporary one
    back, back_geometry = read_label(out / f"case{ending}")
    assert np.array_equal(back, labels) and back_geometry == geometry


def test_written_label_maps_are_readable_by_others_as_files_created_by_open_are(tmp_path):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    labels = np.zeros((3, 4, 5), np.int16)
    _, geometry = read_label(write_nifti(tmp_path / "ref.nii.gz", labels))
    for name in ("a.nrrd", "b.mha", "c.nii.gz", "d.mhd"):
        write_label(labels, tmp_path / "out" / name, geometry)
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_labels_predicted_for_jpeg_images_are_written_as_png_which_keeps_them(tmp_path):
    from autoseg.inference.dicom_cases import output_files
    from autoseg.io.images import label_file_ending

    labels = np.zeros((32, 32), np.uint8)
    labels[8:20, 5:25], labels[12:16, 10:30] = 1, 2
    geometry = read_header(_png(tmp_path / "x.png", labels))[0]
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "lossy.jpg"))
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lossy.jpg"))), labels)
    assert label_file_ending(".jpg") == ".png" and label_file_ending(".nii.gz") == ".nii.gz"
    assert output_files("case", ".jpg", tmp_path, "nifti") == [tmp_path / "case.png"]
    write_label(labels[None], tmp_path / f"case{label_file_ending('.jpg')}", geometry)
    assert np.array_equal(read_label(tmp_path / "case.png")[0][0], labels)


def _png(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def test_labels_above_255_survive_png_and_a_label_map_does_not_keep_the_images_display_window(tmp_path):
    labels = np.array([[0, 1, 300], [7, 300, 2]], np.int16)
    geometry = read_header(_png(tmp_path / "ref.png", np.zeros((2, 3), np.uint8)))[0]
    write_label(labels[None], tmp_path / "big.png", geometry)
    assert np.array_equal(read_label(tmp_path / "big.png")[0][0], labels)
    image = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.eye(4))
    image.header["cal_min"], image.header["cal_max"] = -1000, 3000  # a CT's window
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    _, ct_geometry = read_image(tmp_path / "ct.nii.gz")
    write_label(np.ones((4, 5, 6), np.int16), tmp_path / "seg.nii.gz", ct_geometry, reference_file=tmp_path / "ct.nii.gz")
    header = nib.load(str(tmp_path / "seg.nii.gz")).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 0.0)


def test_the_label_maps_of_one_model_share_a_dtype_whatever_each_case_holds(tmp_path):
    # nnU-Net writes uint8 maps; a model with a label above 255 needs uint16 for every case, also one predicted
    # all background, so that a folder of predictions loads as one dtype. The dtype is read back by nibabel.
    image = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.eye(4))
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    _, geometry = read_image(tmp_path / "ct.nii.gz")
    background, some = np.zeros((4, 5, 6), np.int16), np.full((4, 5, 6), 2, np.int16)
    written = {}
    for name, labels, largest in [("empty_big", background, 300), ("two_big", some, 300),
                                  ("empty_small", background, 2), ("above_largest", some * 150, 2),
                                  ("unknown", some, None)]:
        write_label(labels, tmp_path / f"{name}.nii.gz", geometry, tmp_path / "ct.nii.gz", largest_label=largest)
        loaded = nib.load(str(tmp_path / f"{name}.nii.gz"))
        assert np.array_equal(np.asarray(loaded.dataobj).transpose(2, 1, 0), labels), name
        written[name] = loaded.get_data_dtype()
    assert written == {"empty_big": np.uint16, "two_big": np.uint16, "empty_small": np.uint8,
                       "above_largest": np.uint16, "unknown": np.uint8}


def test_a_3d_tiff_takes_its_spacing_from_nnunets_sidecar_json_and_a_label_map_writes_one(tmp_path):
    import json

    volume = np.random.default_rng(6).integers(0, 3, (4, 5, 6)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "cell_0000.tif"))
    (tmp_path / "cell.json").write_text(json.dumps({"spacing": [3.0, 0.5, 0.7]}))  # Tiff3DIO: z, y, x
    array, geometry = read_image(tmp_path / "cell_0000.tif")
    assert array.shape == (1, 4, 5, 6) and geometry.array_spacing == [3.0, 0.5, 0.7]
    write_label(volume, tmp_path / "out" / "cell.tif", geometry)
    assert json.loads((tmp_path / "out" / "cell.json").read_text()) == {"spacing": [3.0, 0.5, 0.7]}
    labels, label_geometry = read_label(tmp_path / "out" / "cell.tif")
    assert np.array_equal(labels, volume) and label_geometry.array_spacing == [3.0, 0.5, 0.7]
    (tmp_path / "cell.json").write_text(json.dumps({"spacing": [3.0, 0.5]}))
    with pytest.raises(ImageReadError, match=r"cell\.json: 'spacing' must be a list of 3 numbers"):
        read_header(tmp_path / "cell_0000.tif")
    (tmp_path / "cell.json").unlink()  # ITK alone would make up z = 1 mm: refused, naming the file it needs
    with pytest.raises(ImageReadError, match=r"cell_0000\.tif: is a 3D TIFF without its spacing file cell\.json"):
        read_header(tmp_path / "cell_0000.tif")


def test_the_files_an_image_is_read_from_besides_itself_are_found(tmp_path):
    import json

    from autoseg.io.images import companion_files

    labels = np.zeros((3, 4, 5), np.int16)
    _, geometry = read_label(write_nifti(tmp_path / "ref.nii.gz", labels))
    write_label(labels, tmp_path / "a.mhd", geometry)
    assert [p.name for p in companion_files(tmp_path / "a.mhd")] == [
        next(p.name for p in tmp_path.iterdir() if p.name.startswith("a.") and p.name != "a.mhd")]
    write_label(labels, tmp_path / "b.nhdr", geometry)
    assert len(companion_files(tmp_path / "b.nhdr")) == 1 and companion_files(tmp_path / "b.nhdr")[0].is_file()
    sitk.WriteImage(sitk.GetImageFromArray(labels.astype(np.uint8)), str(tmp_path / "c_0000.tif"))
    assert companion_files(tmp_path / "c_0000.tif") == []
    (tmp_path / "c.json").write_text(json.dumps({"spacing": [1, 1, 1]}))
    assert companion_files(tmp_path / "c_0000.tif") == [tmp_path / "c.json"]
    assert companion_files(tmp_path / "ref.nii.gz") == []
