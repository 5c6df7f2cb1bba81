"""Uploaded bytes -> pixels, with every way a request can be wrong answered as a `BadInput` (an HTTP 4xx
status and a message), never an exception that would become a 500; a model replica returns its user
errors as an answer (user_error) that the ingress turns into the same 4xx.

Decoding is bounded before any pixel is decoded: the image's header gives its size, checked against
the pixel limit and, times its bytes per pixel, the byte limit (a 100-kB PNG can declare 50 000 x 50 000
pixels, a decompression bomb); a NIfTI header gives the volume's shape and voxel type, checked against
the voxel and byte limits before the data is read (a 130-kB .nii.gz can hold 256^3 float64 zeros,
134 MB), and a gzipped volume is inflated no further than its header says the data reaches.
"""

import io
import math
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

from datasets.errors import UserError
from datasets.microscopy import BadImage, NeedsChoice, TooLarge, read_channel, read_tiff
from datasets.records import finite_pixels, to_rgb8
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


def _over(what: str, size: str, amount: int, unit: str, limit: int, setting: str) -> BadInput:
    return BadInput(
        413, f"{what} is {size} = {amount} {unit}, over this server's limit of {limit} {unit} ({setting})"
    )


def decode_image(
    data: bytes, max_pixels: int, max_bytes: int, page: int | None = None, channel: int | None = None
) -> np.ndarray:
    """HxWx3 uint8 RGB of an uploaded image (decode_pixels, 16-bit and float scaled by their own range):
    what a slice classifier, a crop and the page take."""
    return to_rgb8(decode_pixels(data, max_pixels, max_bytes, page, channel))


def decode_pixels(
    data: bytes, max_pixels: int, max_bytes: int, page: int | None = None, channel: int | None = None
) -> np.ndarray:
    """The pixels of an uploaded PNG, JPEG, BMP or TIFF/OME-TIFF image at their full precision (HxW or
    HxWxC, C 1-4, the stored dtype: 16-bit stays 16-bit until the model's normalisation, as in training and
    platform.predict); a TIFF stack or a multi-channel TIFF needs `page` / `channel`, as platform.predict
    does. 413 when the header declares more than `max_pixels` pixels or `max_bytes` bytes of samples."""
    if not data:
        raise BadInput(400, "empty request body: expected the bytes of a PNG, JPEG or TIFF image")
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # TIFF and BigTIFF
        pixels = _tiff_pixels(data, max_bytes, page, channel)
    else:
        pixels = _pil_pixels(data, max_pixels, max_bytes)
        if channel is not None:
            try:
                pixels = read_channel(pixels[..., None] if pixels.ndim == 2 else pixels, channel, flag="")
            except NeedsChoice as e:
                raise BadInput(422, str(e)) from None
    if pixels.shape[0] * pixels.shape[1] > max_pixels:  # a TIFF's plane: its bytes were bounded above
        size = f"{pixels.shape[1]}x{pixels.shape[0]}"
        raise _over("image", size, pixels.shape[0] * pixels.shape[1], "pixels", max_pixels, "max_pixels")
    if pixels.ndim == 3 and pixels.shape[2] not in (1, 2, 3, 4):
        raise BadInput(415, f"{pixels.shape[2]}-channel image; expected grey, RGB or RGBA")
    # NaN pixels are "no data" and scaled as the readers do (datasets/normalize.py): the same picture as
    # platform.predict and training give, not an error and not an all-black image; none finite is an error
    try:
        return finite_pixels(pixels, Path("upload"))
    except UserError as e:
        raise BadInput(400, str(e)) from None


def _tiff_pixels(data: bytes, max_bytes: int, page: int | None, channel: int | None) -> np.ndarray:
    """A TIFF upload through platform.predict's reader (tifffile: 16-bit, multi-channel, stacks, OME)."""
    try:
        return read_tiff(io.BytesIO(data), page, channel, max_bytes=max_bytes, flag="").pixels
    except TooLarge as e:
        raise _over("image", e.size, e.nbytes, "bytes", max_bytes, "max_decoded_mb") from None
    except NeedsChoice as e:  # a readable image, but the request's page or channel is missing or wrong
        raise BadInput(422, str(e)) from None
    except BadImage as e:
        raise BadInput(400, str(e)) from None


def _pil_pixels(data: bytes, max_pixels: int, max_bytes: int) -> np.ndarray:
    """A PNG, JPEG or BMP upload through PIL, its size checked from the header before decoding."""
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
    except Exception as e:  # PIL's format plugins raise many types for a corrupt header; all mean that
        raise BadInput(400, f"unreadable image header ({type(e).__name__}: {e})") from None
    with im:
        if im.format not in IMAGE_FORMATS:
            raise BadInput(415, f"unsupported image type {im.format}; expected PNG, JPEG or TIFF (or BMP)")
        width, height = im.size
        if width == 0 or height == 0:
            raise BadInput(400, f"zero-size image ({width}x{height} pixels)")
        size = f"{width}x{height}"
        if width * height > max_pixels:
            raise _over("image", size, width * height, "pixels", max_pixels, "max_pixels")
        per_pixel = _sample_bytes(im.mode)
        if width * height * per_pixel > max_bytes:
            size = f"{size} pixels x {per_pixel} bytes"
            raise _over("image", size, width * height * per_pixel, "bytes", max_bytes, "max_decoded_mb")
        try:
            im.load()
            if im.mode not in _ARRAY_MODES:
                im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
            return np.asarray(im)
        except MemoryError:  # the limits above failed, not the upload: a server error
            raise
        except Exception as e:  # as above: a corrupt or truncated stream, whichever plugin reads it
            raise BadInput(400, f"truncated or corrupt {im.format} image ({type(e).__name__}: {e})") from None


def _sample_bytes(mode: str) -> int:
    """Bytes per pixel of a PIL mode as _pil_pixels holds it (modes it converts become RGBA, 4)."""
    if mode not in _ARRAY_MODES:
        return 4
    layout = ImageMode.getmode(mode)
    return len(layout.bands) * np.dtype(layout.typestr).itemsize


def is_nifti(data: bytes) -> bool:
    """A NIfTI-1/2 file, plain or gzipped (.nii, .nii.gz)."""
    if data[:2] == b"\x1f\x8b":
        return True
    return data[344:348] in (b"n+1\0", b"ni1\0") or data[4:8] in (b"n+2\0", b"ni2\0")


def decode_volume(data: bytes, max_voxels: int, max_bytes: int) -> np.ndarray:
    """A 3D uint8 volume (datasets.volumes.load_volume's scaling) from uploaded .nii or .nii.gz bytes; 413
    when its header declares more than `max_voxels` voxels or `max_bytes` bytes of voxel data. A gzipped
    upload is inflated only as far as its header says the volume reaches, so a gzip bomb costs no more."""
    gzipped = data[:2] == b"\x1f\x8b"
    header = _nifti_header(_gunzip(data, _NIFTI2_HEADER) if gzipped else data)
    end = _volume_end(header, max_voxels, max_bytes)
    raw = _gunzip(data, end) if gzipped else data
    if len(raw) < end:
        raise BadInput(400, f"truncated NIfTI volume: {len(raw)} bytes, its header declares {end}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.nii"
        path.write_bytes(raw[:end])
        try:
            return load_volume(path)
        except UserError as e:
            raise BadInput(400, str(e).replace(str(path), "upload")) from None
        except MemoryError:  # as in _pil_pixels
            raise
        except Exception as e:  # nibabel's scaling of odd headers; never a server path in the answer
            raise BadInput(400, f"unreadable NIfTI data ({type(e).__name__})") from None


_NIFTI2_HEADER = 540  # bytes; NIfTI-1's is 348


def _gunzip(data: bytes, size: int) -> bytes:
    """The first `size` bytes (or fewer, if the stream ends first) of gzipped `data`."""
    try:
        return zlib.decompressobj(wbits=31).decompress(data, size)
    except zlib.error as e:
        raise BadInput(415, f"not a readable .nii.gz (corrupt gzip stream: {e})") from None


def _nifti_header(head: bytes):
    """The NIfTI-1 or NIfTI-2 header at the start of `head` (either byte order); 415 if there is none."""
    try:
        size = next(n for n in (348, 540) for order in "<>" if head[:4] == struct.pack(f"{order}i", n))
        kind = nib.Nifti1Header if size == 348 else nib.Nifti2Header
        return kind.from_fileobj(io.BytesIO(head[:size]))
    except StopIteration:
        raise BadInput(415, "not a NIfTI volume: expected the bytes of a .nii or .nii.gz file") from None
    except Exception as e:  # nibabel raises many types for a bad header; all mean "not a volume"
        raise BadInput(415, f"not a readable NIfTI volume ({str(e).splitlines()[0]})") from None


def _volume_end(header, max_voxels: int, max_bytes: int) -> int:
    """Where the voxel data a header declares ends, in bytes, after checking it is a volume this server
    can hold: positive dimensions, integer or float voxels, within the voxel and byte limits."""
    try:
        shape, dtype = header.get_data_shape(), header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as e:  # as in _nifti_header
        raise BadInput(415, f"not a readable NIfTI volume ({str(e).splitlines()[0]})") from None
    dims = "x".join(map(str, shape))
    if not shape or min(shape) < 1:
        raise BadInput(400, f"volume has dimensions {dims or 'none'}; expected positive sizes")
    if dtype.kind not in "buif":
        raise BadInput(415, f"unsupported voxel type {dtype}; expected integer or float voxels")
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise _over("volume", dims, voxels, "voxels", max_voxels, "max_voxels")
    nbytes = voxels * dtype.itemsize
    if offset + nbytes > max_bytes:  # the header's offset counts: a gzipped upload is inflated that far
        size = f"{dims} voxels x {dtype.itemsize} bytes + {offset} header bytes"
        raise _over("volume", size, offset + nbytes, "bytes", max_bytes, "max_decoded_mb")
    return offset + nbytes
