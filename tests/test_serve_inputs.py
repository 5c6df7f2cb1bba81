"""Uploaded bytes -> pixels (deploy/inputs.py), checked against PIL/nibabel decoding of the same files, and
every kind of bad upload answered with its 4xx status before anything large is decoded."""

import gzip
import io
import struct
import time
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
GB = 2**30  # a byte limit these tests do not reach


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
    assert np.array_equal(decode_image(IMAGES[0].read_bytes(), 10**8, GB), load_image(IMAGES[0]))


def test_16_bit_grey_tiff_and_palette_png():
    grey = np.linspace(1000, 40000, 64 * 48).reshape(48, 64).astype(np.uint16)
    decoded = decode_image(encode(grey, "TIFF"), 10**6, GB)
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    # scaled by the image's own range, as datasets.records.load_image does for 16-bit training images
    expected = np.round((grey.astype(np.float32) - 1000) / 39000 * 255).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 2], expected)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    assert np.array_equal(decode_image(buffer.getvalue(), 10**6, GB), np.asarray(palette.convert("RGB")))


def test_jpeg_and_rgba():
    rgba = np.random.default_rng(1).integers(0, 255, (16, 16, 4), dtype=np.uint8)
    assert np.array_equal(decode_image(encode(rgba, "PNG"), 10**6, GB), rgba[..., :3])
    assert decode_image(encode(rgba[..., :3], "JPEG"), 10**6, GB).shape == (16, 16, 3)


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
        decode_image(body, 10**8, GB)
    assert caught.value.status == status


def test_pixel_limit_counts_pixels_not_bytes():
    body = encode(np.zeros((100, 100), np.uint8), "PNG")  # tiny file, 10 000 pixels
    assert decode_image(body, 10_000, GB).shape == (100, 100, 3)
    with pytest.raises(BadInput, match="over this server's limit of 9999") as caught:
        decode_image(body, 9_999, GB)
    assert caught.value.status == 413


def test_nifti_volumes(tmp_path):
    shell = SHARED_DATA / "microct_shell" / "shell_225x128x128.nii.gz"
    body = shell.read_bytes()
    assert is_nifti(body) and is_nifti(gzip.decompress(body)) and not is_nifti(IMAGES[0].read_bytes())
    from datasets.volumes import load_volume

    expected = load_volume(shell)
    assert np.array_equal(decode_volume(body, 10**8, GB), expected)
    assert np.array_equal(decode_volume(gzip.decompress(body), 10**8, GB), expected)  # plain .nii
    with pytest.raises(BadInput, match="225x128x128 = 3686400 voxels") as caught:
        decode_volume(body, 10**6, GB)
    assert caught.value.status == 413
    with pytest.raises(BadInput) as caught:
        decode_volume(body[: len(body) // 2], 10**8, GB)  # truncated gzip
    assert caught.value.status in (400, 415)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)), flat)
    with pytest.raises(BadInput, match="expected a 3D volume") as caught:
        decode_volume(flat.read_bytes(), 10**8, GB)
    assert caught.value.status == 400


def test_serve_yaml_args_are_valid_settings():
    import yaml

    doc = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "deploy.app:build_app"
    settings = settings_from(app["args"], "deploy/serve.yaml")
    assert settings.detector == "models:/dsb2018_quick@champion" and settings.tracking_uri  # made explicit
    defaults = ServeSettings(detector="x")
    for key in app["args"]:  # the file documents the defaults
        if key not in ("detector", "tracking_uri"):
            assert getattr(defaults, key) == getattr(settings, key), key
    from datasets.errors import UserError

    with pytest.raises(UserError, match="unknown config key 'max_batch' .*max_batch_size"):
        settings_from({"detector": "x", "max_batch": 4}, "serve.yaml")
    with pytest.raises(UserError, match="nothing to serve"):
        settings_from({}, "serve.yaml")


def nifti_bytes(volume: np.ndarray, **header) -> bytes:
    """A NIfTI-1 file of `volume`, with header fields (dim, datatype, vox_offset, ...) set afterwards."""
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header["vox_offset"] = 352  # the data right after the header and its 4 extension bytes
    for key, value in header.items():
        image.header[key] = value
    return image.header.binaryblock + b"\0" * 4 + np.asarray(volume).tobytes(order="F")


def test_the_byte_limit_counts_the_bytes_voxels_and_pixels_expand_to():
    """Issue #21: a 256^3 float64 all-zero .nii.gz is a ~130-kB upload of 134 MB of voxels; the voxel
    limit alone let it through. Now the header's voxels x item size meet max_decoded_mb before decoding."""
    zeros = gzip.compress(nifti_bytes(np.zeros((256, 256, 256))))
    assert len(zeros) < 200_000
    with pytest.raises(BadInput, match="256x256x256 voxels x 8 bytes .* over this server's limit") as caught:
        decode_volume(zeros, 10**9, 2**26)
    assert caught.value.status == 413
    small = nifti_bytes(np.arange(4096, dtype=np.float64).reshape(16, 16, 16))  # 32 kB of voxels
    assert decode_volume(small, 10**9, 32768 + 352).shape == (16, 16, 16)
    with pytest.raises(BadInput, match="max_decoded_mb"):
        decode_volume(small, 10**9, 32768 + 351)
    grey16 = encode(np.zeros((100, 100), np.uint16), "TIFF")  # 2 bytes a pixel
    assert decode_image(grey16, 10**6, 20_000).shape == (100, 100, 3)
    with pytest.raises(BadInput, match="100x100 uint16 = 20000 bytes") as caught:
        decode_image(grey16, 10**6, 19_999)
    assert caught.value.status == 413


def test_a_gzip_bomb_is_inflated_only_as_far_as_its_header_says():
    """A 4^3 volume followed by 256 MB of zeros in one gzip stream: decoded at once, the zeros unread."""
    deflate = zlib.compressobj(1, wbits=31)
    parts = [deflate.compress(nifti_bytes(np.ones((4, 4, 4), np.uint8)))]
    zeros = bytes(2**24)
    parts += [deflate.compress(zeros) for _ in range(16)]
    bomb = b"".join(parts) + deflate.flush()
    start = time.perf_counter()
    assert decode_volume(bomb, 10**6, 2**20).shape == (4, 4, 4)
    assert time.perf_counter() - start < 1.0  # inflating all of it takes seconds


@pytest.mark.parametrize(
    "header, status, words",
    [
        ({"dim": [3, -5, 4, 4, 1, 1, 1, 1]}, 400, "expected positive sizes"),  # was an OverflowError
        ({"datatype": 128, "bitpix": 24}, 415, "unsupported voxel type"),  # RGB24, was a TypeError
        ({"vox_offset": 2**31}, 413, "max_decoded_mb"),  # would inflate 2 GB to reach the data
    ],
    ids=["negative-dim", "rgb24", "far-offset"],
)
def test_hostile_nifti_headers_are_4xx(header, status, words):
    body = nifti_bytes(np.zeros((4, 4, 4), np.uint8), **header)
    for upload in (body, gzip.compress(body)):
        with pytest.raises(BadInput, match=words) as caught:
            decode_volume(upload, 10**6, 2**20)
        assert caught.value.status == status


def test_errors_name_no_server_path():
    body = nifti_bytes(np.random.default_rng(0).integers(0, 255, (4, 4, 4), np.uint8))
    packed = gzip.compress(body)
    for upload in (body[:400], packed[: len(packed) // 2], nifti_bytes(np.zeros((8, 8), np.uint8))):
        with pytest.raises(BadInput) as caught:
            decode_volume(upload, 10**6, 2**20)
        assert "/" not in str(caught.value).replace("n/a", ""), str(caught.value)


def test_a_float_image_with_nan_is_scaled_on_its_finite_pixels_as_the_readers_do():
    from datasets.records import to_rgb8

    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    assert decode_image(encode(pixels, "TIFF"), 10**6, GB)[..., 0].max() == 255
    pixels[3, 5] = np.nan
    decoded = decode_image(encode(pixels, "TIFF"), 10**6, GB)
    assert np.array_equal(decoded, to_rgb8(pixels))  # what platform.predict and training see
    assert (
        decoded[..., 0].max() == 255 and decoded[3, 5, 0] == 0
    )  # not blackened; the NaN is the lowest value
    with pytest.raises(BadInput, match="finite") as caught:
        decode_image(encode(np.full((8, 8), np.nan, np.float32), "TIFF"), 10**6, GB)
    assert caught.value.status == 400


def test_pixels_keep_their_precision_and_tiffs_read_as_platform_predict_reads_them(tmp_path):
    import tifffile

    from datasets.microscopy import read_image
    from deploy.inputs import decode_pixels

    rng = np.random.default_rng(0)
    grey16 = rng.integers(1000, 1256, (40, 50)).astype(np.uint16)  # 256 levels in 16-bit, as microscopes give
    grey16[0, 0] = 65535  # one hot pixel: squashed to 8-bit by range, the levels above would fall to ~1
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, grey16, compression="lzw")  # what Fiji writes; needs imagecodecs
    decoded = decode_pixels(path.read_bytes(), 10**6, GB)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, grey16)
    assert np.array_equal(decoded, read_image(path).pixels)
    png16 = encode(grey16, "PNG")
    assert np.array_equal(decode_pixels(png16, 10**6, GB), grey16)
    assert len(np.unique(decode_image(png16, 10**6, GB))) <= 3  # why the detector must get decode_pixels

    # A 5-channel image and a Z-stack need the channel and the plane, as platform.predict's options do.
    channels = rng.integers(0, 4096, (5, 30, 20)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c5.tif", channels, metadata={"axes": "CYX"})
    body = (tmp_path / "c5.tif").read_bytes()
    with pytest.raises(BadInput, match="5 channels .*choose one with channel") as caught:
        decode_pixels(body, 10**6, GB)
    assert caught.value.status == 422
    assert np.array_equal(decode_pixels(body, 10**6, GB, channel=3), channels[3])
    with pytest.raises(BadInput, match="channel 5: the image has 5") as caught:
        decode_pixels(body, 10**6, GB, channel=5)
    assert caught.value.status == 422
    stack = rng.random((3, 16, 16)).astype(np.float32)
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    body = (tmp_path / "z.tif").read_bytes()
    with pytest.raises(BadInput, match="3 planes .*choose one with page \\(0-2\\)"):
        decode_pixels(body, 10**6, GB)
    assert np.array_equal(decode_pixels(body, 10**6, GB, page=2), stack[2])
    assert np.array_equal(
        decode_pixels(encode(grey16.astype(np.uint8), "PNG"), 10**6, GB, channel=0), grey16 % 256
    )

    # The byte limit counts the whole series, from the header; the pixel limit the plane used.
    with pytest.raises(BadInput, match="5x30x20 uint16 = 6000 bytes") as caught:
        decode_pixels((tmp_path / "c5.tif").read_bytes(), 10**6, 5999, channel=0)
    assert caught.value.status == 413
    with pytest.raises(BadInput, match="max_pixels") as caught:
        decode_pixels(path.read_bytes(), 1999, GB)
    assert caught.value.status == 413
