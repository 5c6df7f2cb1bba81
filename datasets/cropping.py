"""Automatic crop and background removal of one object in a photo or slice, before classifying it.

Slice classifiers are trained on micro-CT slices: one object, centred, on a black background. A user's
image (a slice exported with wide margins, a photo of a shell on a light tray) is brought to that form:

1. grey levels; Otsu's threshold splits object from background. If the image border is mostly above the
   threshold the background is the light side, and the grey levels are inverted first.
2. `sensitivity` in [0, 1] moves the threshold: 0.5 is Otsu's; towards 1 it goes down to the mean grey
   level of the background (fainter parts of the object are kept), towards 0 up to the mean grey level
   of the object (only its brighter parts are kept). Linear in between.
3. the largest connected component, holes filled, is the object; everything else becomes black.
4. a square crop around it with `margin` (a fraction of its larger side) on every side; parts of the
   square outside the image are black. Square, because the classifier resizes to a square input.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from datasets.errors import UserError


@dataclass(frozen=True)
class Crop:
    image: np.ndarray  # (S, S, 3) uint8: the object on black, square
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the square in the input (may reach outside it)
    mask: np.ndarray  # (H, W) bool: the object in the input
    threshold: float  # grey level used (after inversion, if any)
    inverted: bool  # True when the background was the light side


def crop_object(image: np.ndarray, sensitivity: float = 0.5, margin: float = 0.05) -> Crop:
    """The main object of an HxWx3 (or HxW) uint8 image cropped square onto black; see the module doc.
    UserError when the image is uniform or no object is left at this sensitivity."""
    if not 0 <= sensitivity <= 1:
        raise UserError(f"sensitivity: expected a number in [0, 1], got {sensitivity}")
    if not 0 <= margin <= 1:
        raise UserError(f"margin: expected a fraction in [0, 1], got {margin}")
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    grey = rgb.astype(np.float32).mean(axis=2)
    if grey.min() == grey.max():
        raise UserError(f"the image is uniform (all pixels {grey.min():g}): no object to crop")
    otsu = float(threshold_otsu(grey))
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    inverted = bool(np.median(border) > otsu)
    if inverted:
        grey, otsu = 255.0 - grey, 255.0 - otsu
    above = grey > otsu
    background, foreground = float(grey[~above].mean()), float(grey[above].mean())
    if sensitivity <= 0.5:  # from the object's mean grey level (0) to Otsu's threshold (0.5)
        threshold = otsu + (1 - 2 * sensitivity) * (foreground - otsu)
    else:  # from Otsu's threshold (0.5) to the background's mean (1)
        threshold = otsu - (2 * sensitivity - 1) * (otsu - background)
    labels, n = ndimage.label(grey > threshold)
    if n == 0:
        raise UserError(f"no object above the threshold at sensitivity {sensitivity}; try a higher one")
    sizes = np.bincount(labels.ravel())[1:]
    mask = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))

    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(y1 - y0, x1 - x0)
    side += 2 * int(round(margin * side))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = cy - side // 2, cx - side // 2
    box = (int(left), int(top), int(left + side), int(top + side))

    out = np.zeros((side, side, 3), np.uint8)
    height, width = mask.shape
    sy0, sx0 = max(top, 0), max(left, 0)  # the part of the square inside the image
    sy1, sx1 = min(top + side, height), min(left + side, width)
    kept = np.where(mask[sy0:sy1, sx0:sx1, None], rgb[sy0:sy1, sx0:sx1], 0)
    out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = kept
    return Crop(out, box, mask, threshold, inverted)
