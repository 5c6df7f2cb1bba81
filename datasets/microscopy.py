"""The images a scientist brings to prediction: files, folders (recursively) and globs of PNG, JPEG, BMP and
TIFF/OME-TIFF, read at their full precision (16-bit stays 16-bit until the model's normalisation) with the
physical pixel size their metadata states.

TIFFs go through tifffile (multi-page, multi-channel, OME and ImageJ metadata); the rest through PIL with
its decompression-bomb limit. A stack (Z, T or several pages) or a multi-channel fluorescence image needs a
choice (`page`, `channel`): predicting the first plane of a Z-stack without being asked would give counts
of one plane that look like the sample's.

Pixel size, in micrometres, from (first found): OME-XML `PhysicalSizeX` (with its unit), ImageJ's `unit`
with the X resolution tag, or the X resolution tag in pixels per centimetre. Resolution tags in pixels per
inch are ignored: they are the 72/96/300 dpi that cameras and image editors write, not a microscope's.
"""

import glob
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

from datasets.errors import UserError
from datasets.records import IMAGE_SUFFIXES, finite_pixels, open_image

TIFF_SUFFIXES = (".tif", ".tiff")
MAX_BYTES = 8 << 30  # one decoded image at most: a bound on what a hostile or mistaken file can allocate
# micrometres per unit, for OME's PhysicalSizeXUnit and ImageJ's `unit`
UNITS_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "\\u00B5m": 1.0, "nm": 1e-3}
PLANE_AXES = "ZTQIR"  # tifffile axes that number planes (depth, time, pages, ...)


class BadImage(Exception):
    """One input file that cannot be predicted (unreadable, wrong rank, needs a choice): reported with its
    reason and skipped, while the other files are processed."""


class NeedsChoice(BadImage):
    """A stack or multi-channel image without the plane or channel to use, or with one it does not have."""


class TooLarge(BadImage):
    """An image whose decoded pixels would pass the byte limit (found from its header, before decoding)."""

    def __init__(self, size: str, nbytes: int, limit: int):
        super().__init__(f"{size} pixels are {nbytes} bytes decoded, over the limit of {limit} bytes")
        self.size, self.nbytes = size, nbytes


@dataclass(frozen=True)
class MicroscopyImage:
    pixels: np.ndarray  # HxW or HxWxC (C 1-4), the stored dtype
    pixel_size_um: float | None  # physical size of one pixel (x), None when the file does not say


def find_images(inputs: list[str], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files that `inputs` name: files as given, folders searched recursively for names ending in
    `suffixes` (hidden ones and Cellpose's `*_masks.*` label images left out), globs expanded; sorted
    within each input, each file once."""
    found: list[Path] = []
    for value in inputs:
        path = Path(value).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if _is_image(p, path, suffixes))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{value}: no such file, folder or matching files")
        found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"{' '.join(inputs)}: no files ({', '.join(suffixes)}) found")
    return unique


def _is_image(path: Path, root: Path, suffixes: tuple[str, ...]) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    label_image = path.name.split(".")[0].endswith("_masks")  # Cellpose's masks beside their images
    return path.is_file() and not hidden and path.name.lower().endswith(suffixes) and not label_image


def read_image(path: Path, page: int | None = None, channel: int | None = None) -> MicroscopyImage:
    """The pixels and pixel size of one image file; BadImage with the reason when it cannot be used."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return read_tiff(path, page, channel)
    try:
        pixels = open_image(path)
    except UserError as e:
        raise BadImage(str(e).removeprefix(f"{path}: ")) from e
    except MemoryError as e:
        raise BadImage(f"not a readable image ({e})") from e
    if channel is not None:
        pixels = read_channel(pixels[..., None] if pixels.ndim == 2 else pixels, channel)
    return MicroscopyImage(_checked(pixels, path), None)


def read_tiff(
    source: Path | BinaryIO,
    page: int | None = None,
    channel: int | None = None,
    max_bytes: int = MAX_BYTES,
    flag: str = "--",
) -> MicroscopyImage:
    """The pixels and pixel size of a TIFF file or of its bytes (an upload, `io.BytesIO`); BadImage with
    the reason when it cannot be used, TooLarge when its pixels would decode to more than `max_bytes`.
    Messages name the choices `page` and `channel` with `flag` before them (the CLI's options: "--")."""
    try:
        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            size = int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
            if size > max_bytes:
                raise TooLarge(f"{'x'.join(map(str, series.shape))} {series.dtype}", size, max_bytes)
            _check_plane(series.shape, series.axes, page, flag)  # before decoding a stack only to refuse it
            pixels = series.asarray()
            axes = series.axes
            pixel_size = tiff_pixel_size(tif)
    except BadImage:
        raise
    except Exception as e:  # tifffile raises many types for damaged files: all mean "unreadable"
        raise BadImage(f"not a readable TIFF ({type(e).__name__}: {e})") from e
    pixels = _plane(pixels, axes, page)
    axes = "".join(a for a in axes if a not in PLANE_AXES)
    if "C" in axes or "S" in axes:
        pixels = np.moveaxis(pixels, axes.index("C" if "C" in axes else "S"), -1)
        if channel is not None:
            pixels = read_channel(pixels, channel, flag)
        elif "C" in axes and pixels.shape[-1] not in (1, 3):
            raise NeedsChoice(
                f"{pixels.shape[-1]} channels (axes {series.axes}): choose one with {flag}channel"
            )
    elif channel not in (None, 0):
        raise NeedsChoice(f"{flag}channel {channel}: the image has one channel (axes {series.axes})")
    return MicroscopyImage(
        _checked(pixels, source if isinstance(source, Path) else Path("upload")), pixel_size
    )


def _check_plane(shape: tuple[int, ...], axes: str, page: int | None, flag: str) -> None:
    """BadImage unless `page` names one plane of a stack of this shape (a single plane needs none)."""
    count = int(np.prod([n for n, a in zip(shape, axes, strict=True) if a in PLANE_AXES]))
    if count > 1 and page is None:
        raise NeedsChoice(f"{count} planes (axes {axes}): choose one with {flag}page (0-{count - 1})")
    if page is not None and not 0 <= page < count:
        raise NeedsChoice(f"{flag}page {page}: the image has {count} plane(s) (axes {axes})")


def _plane(pixels: np.ndarray, axes: str, page: int | None) -> np.ndarray:
    """The one plane of a stack that `page` numbers (over all plane axes, in file order; checked by
    _check_plane)."""
    planes = [i for i, a in enumerate(axes) if a in PLANE_AXES]
    if not planes:
        return pixels
    moved = np.moveaxis(pixels, planes, range(len(planes)))
    return moved.reshape(-1, *moved.shape[len(planes) :])[page or 0]


def read_channel(pixels: np.ndarray, channel: int, flag: str = "--") -> np.ndarray:
    """One channel of HxWxC pixels; BadImage naming the choice (`flag` + \"channel\") when it has no such."""
    if not 0 <= channel < pixels.shape[-1]:
        raise NeedsChoice(f"{flag}channel {channel}: the image has {pixels.shape[-1]} channel(s)")
    return pixels[..., channel]


def _checked(pixels: np.ndarray, path: Path) -> np.ndarray:
    """HxW or HxWxC (C 1-4) of a numeric type with a finite value, else BadImage saying what it is."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] > 4) or min(pixels.shape[:2]) < 1:
        raise BadImage(f"shape {pixels.shape}: expected a 2-D image, grey or with 1-4 channels")
    if pixels.dtype.kind not in "uif":
        raise BadImage(f"pixels of type {pixels.dtype}: expected integer or float")
    try:
        return finite_pixels(pixels, path)  # NaN pixels are kept: the normalisation leaves them out
    except UserError as e:
        raise BadImage(str(e).removeprefix(f"{path}: ")) from e


def tiff_pixel_size(tif: tifffile.TiffFile) -> float | None:
    """Micrometres per pixel (x) from OME-XML, ImageJ metadata or a per-centimetre resolution tag."""
    if tif.is_ome and tif.ome_metadata:
        size = _ome_pixel_size(tif.ome_metadata)
        if size:
            return size
    page = tif.pages.first
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    numerator, denominator = tag.value
    if not numerator or not denominator:
        return None
    per_unit = denominator / numerator  # units per pixel
    if tif.is_imagej and tif.imagej_metadata:
        unit = str(tif.imagej_metadata.get("unit", ""))
        return per_unit * UNITS_UM[unit] if unit in UNITS_UM else None
    unit_tag = page.tags.get("ResolutionUnit")
    return per_unit * 1e4 if unit_tag is not None and int(unit_tag.value) == 3 else None


def _ome_pixel_size(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            value = element.get("PhysicalSizeX")
            unit = element.get("PhysicalSizeXUnit", "µm")
            if value is None or unit not in UNITS_UM:
                return None
            size = float(value) * UNITS_UM[unit]
            return size if np.isfinite(size) and size > 0 else None
    return None
