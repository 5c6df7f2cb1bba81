"""How an image's pixels become a model's input: 8-bit RGB, the same in training, evaluation, prediction
and serving (the config field `normalize` names the mode).

- range: 8-bit images as they are; other dtypes (16-bit, float) scaled by the whole image's min-max.
- percentile: each channel's 1st-99.8th percentile stretched to 0-255 (clipped), as Cellpose and
  StarDist normalise: a dim fluorescence image and a bright one look alike.
- grey: one grey channel, percentile-stretched, inverted when the background is bright (bright-field,
  H&E) so that objects are always bright on dark, as DSB2018's leading solutions did.

Float images may hold NaN or infinite pixels (ImageJ's "NaN background", ratio images, stitching
borders): the statistics leave them out, as ImageJ does; NaN pixels take the lowest value (the
background's) and infinities the ends of the range. A single NaN must not turn the whole image black.

The statistics are the whole image's, never one tile's (the contrast must not change from tile to tile);
percentiles come from a strided sample of at most SAMPLE_PIXELS pixels, so a memory-mapped mosaic is
never read whole, and an image up to that size (every training image of the bundled data) uses all its
pixels.
"""

import math
from dataclasses import dataclass, replace

import numpy as np

NORMALIZATIONS = ("range", "percentile", "grey")
PERCENTILES = (1.0, 99.8)  # Cellpose's and StarDist's defaults
SAMPLE_PIXELS = 1 << 22


@dataclass(frozen=True)
class Normalization:
    """What `apply` does to any part of one image: values lo..hi (per channel) to 0..255, optionally grey
    first and inverted after."""

    lo: tuple[float, ...] | None  # None: 8-bit pixels are used as they are
    hi: tuple[float, ...] | None
    grey: bool = False
    invert: bool = False


def normalization(image: np.ndarray, mode: str) -> Normalization:
    """The normalisation of a whole image (HxW or HxWxC, C 1-4, any dtype) for `mode`."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize: unknown mode {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
    if mode == "range":
        if image.dtype == np.uint8:
            return Normalization(None, None)
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))  # exact: one pass, no copy of a memmap
        if not math.isfinite(lo) or not math.isfinite(hi):  # infinities (rare): the finite pixels' range
            finite = image[np.isfinite(image)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return Normalization((lo,), (hi,))
    sample = _channels(_sample(image)).astype(np.float32)
    if mode == "grey":
        sample = sample.mean(axis=2, keepdims=True)
    flat = sample.reshape(-1, sample.shape[2])
    if image.dtype.kind == "f":  # NaN and inf pixels left out (0 and 255 when a channel has no other)
        flat = np.where(np.isfinite(flat), flat, np.nan)
        lo, hi = np.nan_to_num(np.nanpercentile(flat, PERCENTILES, axis=0), posinf=255.0, neginf=0.0)
    else:
        lo, hi = np.percentile(flat, PERCENTILES, axis=0)
    norm = Normalization(tuple(lo.tolist()), tuple(hi.tolist()), grey=mode == "grey")
    # Most pixels are background: a grey median above mid-grey means a bright background.
    invert = mode == "grey" and bool(np.median(_scaled(sample, norm)) > 127)
    return replace(norm, invert=invert)


def apply(pixels: np.ndarray, norm: Normalization) -> np.ndarray:
    """HxWx3 uint8 of `pixels` (the image or a part of it) under the whole image's `norm`."""
    pixels = _channels(pixels)
    if norm.grey:
        pixels = pixels.astype(np.float32).mean(axis=2, keepdims=True)
    # always a new array: `pixels` may be a read-only view (Ray's object store) or a memmap
    out = np.array(pixels) if norm.lo is None else _scaled(pixels, norm)
    if norm.invert:
        out = 255 - out
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def normalize(image: np.ndarray, mode: str = "range") -> np.ndarray:
    """A whole image as its model input (HxWx3 uint8)."""
    return apply(image, normalization(image, mode))


def _channels(pixels: np.ndarray) -> np.ndarray:
    """HxWxC with alpha dropped (LA, RGBA: it carries no signal)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return pixels[..., :-1] if pixels.shape[2] in (2, 4) else pixels


def _sample(image: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(math.sqrt(image.shape[0] * image.shape[1] / SAMPLE_PIXELS)))
    return image[::step, ::step]


def _scaled(pixels: np.ndarray, norm: Normalization) -> np.ndarray:
    lo, hi = np.asarray(norm.lo, dtype=np.float32), np.asarray(norm.hi, dtype=np.float32)
    scaled = (pixels.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-6) * 255
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)
