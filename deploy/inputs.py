"""Uploaded bytes -> pixels, with every way a request can be wrong answered as a `BadInput` (an HTTP 4xx
status and a message), never an exception that would become a 500; a model replica returns its user
errors as an answer (user_error) that the ingress turns into the same 4xx.

Decoding is bounded before any pixel is decoded: the image's header gives its size, which is checked
against the pixel limit (a 100-kB PNG can declare 50 000 x 50 000 pixels, a decompression bomb); a
NIfTI header gives the volume's shape, checked against the voxel limit before the data is read.
"""

import io
import math
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.errors import UserError
from datasets.records import to_rgb8
from datasets.volumes import load_volume

# What the dataset readers accept (datasets.records.IMAGE_SUFFIXES), by PIL format name.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
# PIL decodes these modes to arrays to_rgb8 understands; others (palette, 1-bit, CMYK, ...) convert to RGB.
_ARRAY_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F")
_SIGNATURES = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


class BadInput(UserError):
    """The request's fault: `status` is the HTTP status to answer with (400, 413, 415, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def user_error(e: UserError) -> dict:
    """A user error raised inside a model replica, returned (not raised) so the ingress answers 4xx."""
    return {"error": str(e), "status": e.status if isinstance(e, BadInput) else 422}


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of an uploaded PNG, JPEG, TIFF (8/16-bit grey, RGB) or BMP image."""
    if not data:
        raise BadInput(400, "empty request body: expected the bytes of a PNG, JPEG or TIFF image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadInput(413, f"image too large: {e}") from None
    except UnidentifiedImageError:
        known = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
        if known:  # PIL gives up on e.g. a zero width before it tells us the format
            raise BadInput(400, f"unreadable {known} header (zero-size or corrupt image)") from None
        raise BadInput(415, "not an image: expected the bytes of a PNG, JPEG or TIFF file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(400, f"unreadable image header ({e})") from None
    with im:
        if im.format not in IMAGE_FORMATS:
            raise BadInput(415, f"unsupported image type {im.format}; expected PNG, JPEG or TIFF (or BMP)")
        width, height = im.size
        if width == 0 or height == 0:
            raise BadInput(400, f"zero-size image ({width}x{height} pixels)")
        if width * height > max_pixels:
            raise BadInput(
                413,
                f"image is {width}x{height} = {width * height} pixels, over this server's limit of "
                f"{max_pixels} (max_pixels)",
            )
        try:
            im.load()
            if im.mode not in _ARRAY_MODES:
                im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
            pixels = np.asarray(im)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadInput(400, f"truncated or corrupt {im.format} image ({e})") from None
    if pixels.ndim == 3 and pixels.shape[2] not in (1, 2, 3, 4):
        raise BadInput(415, f"{pixels.shape[2]}-channel image; expected grey, RGB or RGBA")
    return to_rgb8(pixels)


def is_nifti(data: bytes) -> bool:
    """A NIfTI-1/2 file, plain or gzipped (.nii, .nii.gz)."""
    if data[:2] == b"\x1f\x8b":
        return True
    return data[344:348] in (b"n+1\0", b"ni1\0") or data[4:8] in (b"n+2\0", b"ni2\0")


def decode_volume(data: bytes, max_voxels: int) -> np.ndarray:
    """A 3D uint8 volume (datasets.volumes.load_volume's scaling) from uploaded .nii or .nii.gz bytes."""
    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            shape = nib.load(path).shape  # the header only: the data is read by load_volume
        except Exception as e:  # nibabel raises many types for a bad header; all mean "not a volume"
            raise BadInput(415, f"not a readable NIfTI volume ({str(e).splitlines()[0]})") from None
        voxels = math.prod(shape)
        if voxels > max_voxels:
            dims = "x".join(map(str, shape))
            raise BadInput(
                413, f"volume is {dims} = {voxels} voxels, over this server's limit of {max_voxels}"
            )
        try:
            return load_volume(path)
        except UserError as e:
            raise BadInput(400, str(e).replace(f"{path}: ", "")) from None
