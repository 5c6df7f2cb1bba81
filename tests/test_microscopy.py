"""What platform.predict reads and measures: files, folders and globs found; 16-bit, multi-channel, stacks
and physical pixel sizes of TIFF/OME-TIFF files written here with tifffile; damaged files refused with a
reason; object measurements against hand-computed values and scikit-image's own functions."""

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.measure import perimeter

from datasets.errors import UserError
from datasets.measure import measure_objects
from datasets.microscopy import BadImage, find_images, read_image


def test_folders_are_searched_recursively_and_sorted(tmp_path):
    for name in ("b/2.png", "b/1.tif", "a.jpg", ".hidden/x.png", "a_masks.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = find_images([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jpg", "b/1.tif", "b/2.png"]
    globbed = find_images([str(tmp_path / "b" / "*.png"), str(tmp_path / "b" / "2.png")])
    assert [p.name for p in globbed] == ["2.png"]  # each file once
    with pytest.raises(UserError, match="nope"):
        find_images([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files"):
        find_images([str(tmp_path / "empty")])


def test_16_bit_tiff_keeps_its_values(tmp_path):
    pixels = (np.arange(40 * 50, dtype=np.uint16) * 31).reshape(40, 50)
    tifffile.imwrite(tmp_path / "a.tif", pixels)
    image = read_image(tmp_path / "a.tif")
    assert image.pixels.dtype == np.uint16 and np.array_equal(image.pixels, pixels)
    assert image.pixel_size_um is None


@pytest.mark.parametrize(("size", "unit", "expected"), [(0.65, "µm", 0.65), (325.0, "nm", 0.325)])
def test_ome_tiff_pixel_size(tmp_path, size, unit, expected):
    path = tmp_path / "a.ome.tif"
    data = np.zeros((30, 40), dtype=np.uint16)
    tifffile.imwrite(path, data, ome=True, metadata={"PhysicalSizeX": size, "PhysicalSizeXUnit": unit})
    assert read_image(path).pixel_size_um == pytest.approx(expected)


def test_resolution_tags_per_centimetre_and_imagej_units_count_but_inches_do_not(tmp_path):
    data = np.zeros((30, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", data, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    assert read_image(tmp_path / "cm.tif").pixel_size_um == pytest.approx(0.5)  # 1e4 um / 20000 px
    tifffile.imwrite(
        tmp_path / "ij.tif", data, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "micron"}
    )
    assert read_image(tmp_path / "ij.tif").pixel_size_um == pytest.approx(0.25)
    tifffile.imwrite(tmp_path / "dpi.tif", data, resolution=(72, 72), resolutionunit="INCH")
    assert read_image(tmp_path / "dpi.tif").pixel_size_um is None


def test_stacks_and_channels_need_a_choice(tmp_path):
    stack = np.stack([np.full((20, 30), k, dtype=np.uint16) for k in range(3)])
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    with pytest.raises(BadImage, match="3 planes.*--page"):
        read_image(tmp_path / "z.tif")
    assert read_image(tmp_path / "z.tif", page=2).pixels.max() == 2
    with pytest.raises(BadImage, match="--page 3"):
        read_image(tmp_path / "z.tif", page=3)
    channels = np.stack([np.full((20, 30), 10 * k, dtype=np.uint16) for k in range(2)])
    tifffile.imwrite(tmp_path / "c.ome.tif", channels, ome=True, metadata={"axes": "CYX"})
    with pytest.raises(BadImage, match="2 channels.*--channel"):
        read_image(tmp_path / "c.ome.tif")
    assert read_image(tmp_path / "c.ome.tif", channel=1).pixels.max() == 10
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert read_image(tmp_path / "rgb.tif").pixels.shape == (20, 30, 3)


def test_damaged_files_are_refused_with_a_reason(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((64, 64), dtype=np.uint16))
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(BadImage, match="TIFF"):
        read_image(tmp_path / "cut.tif")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(BadImage, match="readable"):
        read_image(tmp_path / "cut.png")
    nan = np.zeros((10, 10), dtype=np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    assert np.isnan(read_image(tmp_path / "nan.tif").pixels[3, 3])  # NaN = no data, as in ImageJ
    tifffile.imwrite(tmp_path / "nan.tif", np.full((10, 10), np.nan, np.float32))
    with pytest.raises(BadImage, match="every pixel is NaN or infinite"):
        read_image(tmp_path / "nan.tif")


def test_measurements_match_hand_computed_values_and_scale_to_micrometres():
    labels = np.zeros((40, 60), dtype=np.uint16)
    labels[5:9, 10:16] = 1  # 4 x 6 rectangle
    yy, xx = np.mgrid[:40, :60]
    labels[(yy - 25) ** 2 + (xx - 40) ** 2 <= 8**2] = 2  # a disc
    labels[30:32, 2:30] = 3  # a thin bar
    intensity = np.zeros((40, 60), dtype=np.uint16)
    intensity[5:9, 10:13] = 1000  # half the rectangle
    rows = measure_objects(labels, intensity, pixel_size_um=0.5)
    rect, disc, bar = rows
    assert (rect["object_id"], rect["area_px"]) == (1, 24)
    assert (rect["bbox_x0"], rect["bbox_y0"], rect["bbox_x1"], rect["bbox_y1"]) == (10, 5, 16, 9)
    assert (rect["centroid_x_px"], rect["centroid_y_px"]) == (12.5, 6.5)
    assert rect["mean_intensity"] == pytest.approx(500.0)
    disc_area = int((labels == 2).sum())
    assert disc["area_px"] == disc_area
    assert disc["equivalent_diameter_px"] == pytest.approx(np.sqrt(4 * disc_area / np.pi))
    assert disc["perimeter_px"] == pytest.approx(perimeter(labels == 2))
    assert disc["circularity"] == pytest.approx(4 * np.pi * disc_area / perimeter(labels == 2) ** 2)
    assert disc["circularity"] > 0.85 > 0.3 > bar["circularity"]
    assert rect["circularity"] == 1.0  # capped: the pixel perimeter runs short on a small rectangle
    assert disc["area_um2"] == pytest.approx(disc_area * 0.25)
    assert disc["equivalent_diameter_um"] == pytest.approx(disc["equivalent_diameter_px"] / 2)
    assert "area_um2" not in measure_objects(labels, intensity)[0]  # no pixel size: pixels only
