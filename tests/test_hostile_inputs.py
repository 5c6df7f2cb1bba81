"""Issue #21's hostile dataset files: each is one clear UserError naming file, record and field (never a
traceback, a crash or gigabytes of memory), the CLIs exit 2 and write nothing, and a float image with a
NaN pixel is normalised on its finite pixels instead of turning black."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.microscopy import BadImage, read_image
from datasets.records import load_image, rle_counts
from tests.helpers import run_cli, sample_subset
from tests.hostile_inputs import CASES, coco_file, load_case
from tests.test_cli_errors import _assert_user_error


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_one_clear_error(name, tmp_path):
    build, fmt, expected = CASES[name]
    path = build(tmp_path / "data")
    if expected is None:  # a valid file the reader used to crash on
        assert load_case(path, fmt, rasterise=False) >= 0
        return
    # Read only (mask folders are read when used): the checks run at read time, and a regression must not
    # hand a NaN polygon to pycocotools in this process.
    with pytest.raises(UserError, match=expected) as error:
        load_case(path, fmt, rasterise=fmt == "mask-folders")
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed counts of a mask, computed directly: alternating 0/1 runs down the columns."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


@pytest.mark.parametrize("seed", range(5))
def test_rle_counts_decodes_pycocotools_strings(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 300, size=2))
    mask = rng.random(shape) < rng.uniform(0.01, 0.99)
    mask[: rng.integers(0, shape[0])] = rng.integers(0, 2)  # long runs too (multi-character counts)
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    assert rle_counts(compressed, "t").tolist() == _runs(mask)
    assert rle_counts(compressed.decode(), "t").tolist() == _runs(mask)


@pytest.mark.parametrize(
    "counts, message",
    [("02", None), ("0o", "cut or garbled"), ("0~", "cut or garbled"), ("0" + "o" * 8 + "1", "7 characters")],
)
def test_rle_counts_refuses_garbled_strings(counts, message):
    if message is None:  # valid encoding, but only 2 pixels: check_rle's sum check refuses it
        assert rle_counts(counts, "t").tolist() == [0, 2]
    else:
        with pytest.raises(UserError, match=message):
            rle_counts(counts, "t")


def _nan_ramp() -> np.ndarray:
    image = np.linspace(10, 1010, 20 * 30, dtype=np.float32).reshape(20, 30)
    image[5, 7] = np.nan
    return image


def test_float_tiff_with_a_nan_pixel_is_scaled_on_its_finite_pixels(tmp_path):
    """ImageJ's convention (NaN = no data, left out of the statistics): a microscopist's ratio or
    NaN-background image must look as it does in Fiji, not black."""
    image = _nan_ramp()
    tifffile.imwrite(tmp_path / "nan.tif", image)
    expected = np.round((np.nan_to_num(image, nan=10) - 10) / 1000 * 255).astype(np.uint8)
    pil = load_image(tmp_path / "nan.tif")  # the dataset readers' path (PIL)
    assert np.array_equal(pil[..., 0], expected) and pil[5, 7, 0] == 0
    pixels = read_image(tmp_path / "nan.tif").pixels  # the prediction path (tifffile)
    assert np.isnan(pixels[5, 7]) and np.array_equal(load_image(tmp_path / "nan.tif"), pil)
    tifffile.imwrite(tmp_path / "all-nan.tif", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(UserError, match="all-nan.tif: every pixel is NaN or infinite"):
        load_image(tmp_path / "all-nan.tif")
    with pytest.raises(BadImage, match="every pixel is NaN"):
        read_image(tmp_path / "all-nan.tif")


def test_convert_refuses_a_short_rle_and_a_truncated_image_writing_nothing(tmp_path):
    coco_file(tmp_path / "coco", {"size": [6, 8], "counts": "02"})
    out = run_cli("platform.data", "convert", str(tmp_path / "coco"), str(tmp_path / "out"),
                  "--from", "coco", "--to", "rle-csv")  # fmt: skip
    _assert_user_error(out, "annotations.json: annotation 5", "RLE counts cover 2 pixels")
    root = sample_subset(tmp_path / "src", 2)
    image = sorted(root.glob("*/images/*.png"))[1]
    image.write_bytes(image.read_bytes()[:-200])  # the header is intact: only decoding finds it
    out = run_cli("platform.data", "convert", str(root), str(tmp_path / "out"),
                  "--from", "mask-folders", "--to", "coco")  # fmt: skip
    _assert_user_error(out, image.name, "not a readable image")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_inspect_json_replaces_its_output_whole(tmp_path):
    root = sample_subset(tmp_path / "src", 1)
    numbers = tmp_path / "summary.json"
    numbers.write_text("old contents")
    out = run_cli("platform.data", "inspect", str(root), "--format", "mask-folders",
                  "--json", str(numbers), "--plot", str(tmp_path / "plot.png"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(numbers.read_text())["images"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "src", "summary.json"]  # no temp files


def test_mask_header_is_checked_before_decoding(tmp_path):
    from tests.hostile_inputs import png_bomb

    root = sample_subset(tmp_path / "src", 1)
    mask = sorted(root.glob("*/masks/*.png"))[0]
    png_bomb(mask, 12_000, 12_000)  # 144 MP: under PIL's hard limit, refused by its size alone
    Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(UserError, match=rf"{mask.name}: mask is 12000x12000 pixels but its image is"):
            load_case(root, "mask-folders", rasterise=True)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
