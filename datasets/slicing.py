"""Slices of a loaded micro-CT volume, kept or dropped, cropped and resized for a 2D classifier.

Per volume: one Otsu threshold on the whole volume separates object from background; a slice is kept
when at least `min_foreground` of its pixels are object; it is cropped to a square around the object's
bounding box plus `margin` and resized to `size` (224, or 384 for the larger-input models). The same
cutting runs when a dataset is sliced (datasets/slice_index.py) and when a trained classifier slices a
new volume (trainers/classification/model.py), so a model sees its training slices' crop and scale.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from datasets.errors import UserError
from datasets.volumes import VolumeRecord, load_volume


@dataclass(frozen=True)
class SliceResult:
    record: VolumeRecord
    axis: int  # array axis the slice is taken across (0, 1 or 2)
    index: int  # position along that axis
    foreground: float  # fraction of the slice's pixels above the volume's Otsu threshold
    kept: bool  # False: low-content slice, dropped
    crop: tuple[int, int, int, int] | None  # (row0, col0, row1, col1), end exclusive, may pass the edge
    image: np.ndarray | None  # size x size uint8, None when dropped


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 data: object = values > threshold (scikit-image's convention).

    Maximises the between-class variance w0 * w1 * (mu0 - mu1)^2 over the 256-bin histogram; ties go to
    the lowest threshold, so a 0/255 mask gives 0. Constant data gives its value (nothing is object).
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    return otsu_threshold_from_histogram(hist)


def otsu_threshold_from_histogram(hist: np.ndarray) -> int:
    p = hist / hist.sum()
    levels = np.arange(len(p), dtype=np.float64)
    w0 = np.cumsum(p)[:-1]  # weight of the class <= t, for t = 0 .. 254
    m0 = np.cumsum(p * levels)[:-1]
    mt = float((p * levels).sum())
    w1 = 1.0 - w0
    valid = (w0 > 1e-12) & (w1 > 1e-12)
    if not valid.any():
        return int(np.flatnonzero(hist)[0])
    between = np.zeros_like(w0)
    between[valid] = (mt * w0[valid] - m0[valid]) ** 2 / (w0[valid] * w1[valid])
    return int(np.argmax(between))


def parse_axes(axis: int | str | Sequence[int]) -> tuple[int, ...]:
    """0, 1, 2, "all" (= 0, 1, 2), "0,2" or a sequence of ints."""
    if isinstance(axis, str):
        if axis.strip().lower() == "all":
            return (0, 1, 2)
        try:
            axis = [int(a) for a in axis.split(",")]
        except ValueError:
            raise UserError(f"axis {axis!r}: expected 0, 1, 2, a list such as 0,2, or all") from None
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise UserError(f"axis {axis!r}: expected 0, 1, 2, a list such as 0,2, or all")
    return axes


def square_crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Square box around the mask's bounding box, grown by `margin` of its longer side on every edge.

    Square so that resizing keeps the object's aspect ratio; the box may pass the slice's edge (the crop
    pads there), which is what keeps an object at the border centred.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(r1 - r0, c1 - c0)
    side = int(np.ceil(side * (1 + 2 * margin)))
    # centre on the box's centre (in doubled units to stay in integers)
    top = (int(r0 + r1) - side) // 2
    left = (int(c0 + c1) - side) // 2
    return top, left, top + side, left + side


def whole_slice_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The whole slice, padded to a square (centred) so that resizing keeps the aspect ratio."""
    rows, cols = mask.shape
    side = max(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return top, left, top + side, left + side


def crop_padded(image: np.ndarray, box: tuple[int, int, int, int], fill: int) -> np.ndarray:
    r0, c0, r1, c1 = box
    out = np.full((r1 - r0, c1 - c0), fill, dtype=image.dtype)
    sr0, sc0 = max(r0, 0), max(c0, 0)
    sr1, sc1 = min(r1, image.shape[0]), min(c1, image.shape[1])
    out[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = image[sr0:sr1, sc0:sc1]
    return out


def check_slicing(
    size: int, margin: float, min_foreground: float, crop: str, context: int, distance_scale: float
) -> None:
    """UserError naming the first `volume_slices` setting out of range (the settings as a user gives them)."""
    if not 0 <= distance_scale <= 255:
        raise UserError(f"distance_scale {distance_scale!r}: expected 0 (raw grey) or grey levels per voxel")
    if context not in (0, 1):
        raise UserError(f"context {context!r}: expected 0 (one grey slice) or 1 (neighbours as RGB channels)")
    if crop not in ("object", "none"):
        raise UserError(f"crop {crop!r}: expected object (square around the object) or none (whole slice)")
    if not isinstance(size, int) or size < 8:
        raise UserError(f"size {size!r}: expected an image side in pixels >= 8 (224 or 384)")
    if not 0 <= margin <= 2:
        raise UserError(f"margin {margin!r}: expected a fraction of the object's size between 0 and 2")
    if not 0 <= min_foreground < 1:
        raise UserError(f"min_foreground {min_foreground!r}: expected a fraction of the slice in [0, 1)")


def volume_slices(
    record: VolumeRecord,
    volume: np.ndarray,
    *,
    axes: Sequence[int] = (0,),
    size: int = 224,
    margin: float = 0.1,
    min_foreground: float = 0.01,
    crop: str = "object",
    context: int = 0,
    distance_scale: float = 0.0,
) -> Iterator[SliceResult]:
    """Every slice of one loaded volume along `axes`, kept or dropped, in axis then index order.

    crop="object" cuts a square around the object (`square_crop_box`); crop="none" keeps the whole slice
    (padded to a square), so that the object's size in voxels stays visible to the classifier.
    context=1 makes each image RGB: the slices before, at and after the index (clamped at the volume's
    ends) as red, green and blue, cropped with the centre slice's box - "2.5D" input that shows a 2D
    model the object's shape across the slice.
    distance_scale > 0 replaces every voxel by its Euclidean distance to the background (the Otsu mask) in
    voxels, times distance_scale, capped at 255: each slice then shows the object's local 3D thickness
    (walls, limbs), which one slice of a binary mask cannot."""
    hist = np.bincount(volume.ravel(), minlength=256)
    threshold = otsu_threshold_from_histogram(hist.astype(np.float64))
    # pad crops with the background's typical grey, not black: CT air is rarely 0
    background = hist[: threshold + 1].cumsum()
    fill = int(np.searchsorted(background, background[-1] / 2)) if background[-1] else 0
    mask = volume > threshold
    if distance_scale > 0:
        # imported here: scipy.ndimage takes ~0.4 s to import and only this option needs it
        from scipy.ndimage import distance_transform_edt

        volume = np.minimum(distance_transform_edt(mask) * distance_scale, 255).round().astype(np.uint8)
        fill = 0
    for axis in axes:
        areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        plane = np.prod([n for a, n in enumerate(volume.shape) if a != axis])
        for index in range(volume.shape[axis]):
            foreground = float(areas[index]) / plane
            if foreground < min_foreground or areas[index] == 0:
                yield SliceResult(record, axis, index, foreground, False, None, None)
                continue
            # basic indexing gives a view; ndarray.take copies and is ~50x slower on F-ordered NIfTI data
            where = (slice(None),) * axis + (index,)
            box = square_crop_box(mask[where], margin) if crop == "object" else whole_slice_box(mask[where])
            if context:
                last = volume.shape[axis] - 1
                near = [min(max(index + d, 0), last) for d in (-1, 0, 1)]
                cut = np.dstack([crop_padded(volume[(slice(None),) * axis + (i,)], box, fill) for i in near])
            else:
                cut = crop_padded(volume[where], box, fill)
            resized = Image.fromarray(cut).resize((size, size), Image.Resampling.BILINEAR)
            yield SliceResult(record, axis, index, foreground, True, box, np.asarray(resized))


def iter_slices(records: Iterable[VolumeRecord], **settings) -> Iterator[SliceResult]:
    """Streams slices of many volumes; only one volume is loaded at a time (memory bounded by one).
    `settings` are volume_slices' keyword arguments."""
    for record in records:
        volume = load_volume(record.path)
        yield from volume_slices(record, volume, **settings)
        del volume  # drop the reference before the next load, so two volumes never coexist
