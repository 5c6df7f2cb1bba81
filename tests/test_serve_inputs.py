"""Uploaded bytes -> pixels (deploy/inputs.py), checked against PIL/nibabel decoding of the same files, and
every kind of bad upload answered with its 4xx status before anything large is decoded."""

import gzip
import io
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from datasets.records import load_image
from deploy.inputs import BadInput, decode_image, decode_volume, is_nifti
from deploy.settings import ServeSettings, settings_from
from tests.helpers import REPO, SHARED_DATA

IMAGES = sorted((SHARED_DATA / "dsb2018" / "stage1_train").glob("*/images/*.png"))


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (IHDR, CRC fixed) declares width x height pixels."""
    data = bytearray(encode(np.zeros((1, 1), np.uint8), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_sample_png_decodes_as_training_reads_it():
    assert np.array_equal(decode_image(IMAGES[0].read_bytes(), 10**8), load_image(IMAGES[0]))


def test_16_bit_grey_tiff_and_palette_png():
    grey = np.linspace(1000, 40000, 64 * 48).reshape(48, 64).astype(np.uint16)
    decoded = decode_image(encode(grey, "TIFF"), 10**6)
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    # scaled by the image's own range, as datasets.records.load_image does for 16-bit training images
    expected = np.round((grey.astype(np.float32) - 1000) / 39000 * 255).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 2], expected)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    assert np.array_equal(decode_image(buffer.getvalue(), 10**6), np.asarray(palette.convert("RGB")))


def test_jpeg_and_rgba():
    rgba = np.random.default_rng(1).integers(0, 255, (16, 16, 4), dtype=np.uint8)
    assert np.array_equal(decode_image(encode(rgba, "PNG"), 10**6), rgba[..., :3])
    assert decode_image(encode(rgba[..., :3], "JPEG"), 10**6).shape == (16, 16, 3)


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 400, "empty"),
        (b"hello, not an image", 415, "not an image"),
        (encode(np.zeros((4, 4), np.uint8), "GIF"), 415, "unsupported image type GIF"),
        (IMAGES[0].read_bytes()[:3000], 400, "truncated"),
        (png_claiming(30000, 30000), 413, "900000000 pixels"),  # a decompression bomb's header
        (png_claiming(0, 5), 400, "zero-size"),  # PIL refuses the header itself
    ],
    ids=["empty", "text", "gif", "truncated", "bomb", "zero-width"],
)
def test_bad_images_are_4xx(body, status, words):
    with pytest.raises(BadInput, match=words) as caught:
        decode_image(body, max_pixels=10**8)
    assert caught.value.status == status


def test_pixel_limit_counts_pixels_not_bytes():
    body = encode(np.zeros((100, 100), np.uint8), "PNG")  # tiny file, 10 000 pixels
    assert decode_image(body, 10_000).shape == (100, 100, 3)
    with pytest.raises(BadInput, match="over this server's limit of 9999") as caught:
        decode_image(body, 9_999)
    assert caught.value.status == 413


def test_nifti_volumes(tmp_path):
    shell = SHARED_DATA / "microct_shell" / "shell_225x128x128.nii.gz"
    body = shell.read_bytes()
    assert is_nifti(body) and is_nifti(gzip.decompress(body)) and not is_nifti(IMAGES[0].read_bytes())
    from datasets.volumes import load_volume

    expected = load_volume(shell)
    assert np.array_equal(decode_volume(body, 10**8), expected)
    assert np.array_equal(decode_volume(gzip.decompress(body), 10**8), expected)  # plain .nii
    with pytest.raises(BadInput, match="225x128x128 = 3686400 voxels") as caught:
        decode_volume(body, 10**6)
    assert caught.value.status == 413
    with pytest.raises(BadInput) as caught:
        decode_volume(body[: len(body) // 2], 10**8)  # truncated gzip
    assert caught.value.status in (400, 415)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)), flat)
    with pytest.raises(BadInput, match="expected a 3D volume") as caught:
        decode_volume(flat.read_bytes(), 10**8)
    assert caught.value.status == 400


def test_serve_yaml_args_are_valid_settings():
    import yaml

    doc = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "deploy.app:build_app"
    settings = settings_from(app["args"], "deploy/serve.yaml")
    assert settings.detector == "models:/dsb2018_quick@champion" and settings.tracking_uri  # made explicit
    defaults = ServeSettings(detector="x")
    for key, value in app["args"].items():  # the file documents the defaults
        if key not in ("detector", "tracking_uri"):
            assert getattr(defaults, key) == value, key
    from datasets.errors import UserError

    with pytest.raises(UserError, match="unknown config key 'max_batch' .*max_batch_size"):
        settings_from({"detector": "x", "max_batch": 4}, "serve.yaml")
    with pytest.raises(UserError, match="nothing to serve"):
        settings_from({}, "serve.yaml")
