"""Mask refinement (the config field `mask_refine`): each predicted mask's outline snapped to the image's own
foreground, one pixel of the model's input deep.

Mask R-CNN paints a mask at 28 x 28 in its box and scales it up: for a nucleus of 40-60 px the outline
is off by a pixel or two, which costs little at IoU 0.5 but much at the Kaggle metric's 0.75-0.95.
"otsu": the pixels within BAND of a mask's outline take the image's foreground (Otsu's threshold on the
grey model input, trainers/detection/baseline.foreground, the baseline's); the mask's interior stays, holes
are filled, only its largest piece is kept and its box grows to hold it. The model still decides which
objects there are, how touching ones split and how sure it is (a mask emptied by the threshold keeps its
own pixels). On the 176 unseen DSB2018 images, the dsb2018_cpu model (flips TTA, mask_threshold 0.5) went
from segm AP 0.334 / Kaggle 0.368 to 0.359 / 0.410 with BAND 1 (BAND 2: 0.338 / 0.400).

The band is BAND pixels of what the model saw: an image shrunk to its objects (trainers/detection/scale.py)
by 0.5 is refined 2 px deep, since its masks come back upsampled 2x with outlines off by 2x as many pixels.
On the 176 images (TTA flips, REACH 1.5; segm AP / Kaggle), a 1-px band everywhere vs the scaled one:
seed 1 0.355 / 0.422 vs 0.364 / 0.431, seed 0 0.357 / 0.431 vs 0.357 / 0.437.

A mask is refined in the full-height columns its box spans (decoded from its RLE and encoded back here),
never as a whole-image array: a mosaic of thousands of objects costs thousands of small slabs.
"""

import math

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from datasets.normalize import apply, normalization
from datasets.records import rle_counts
from trainers.detection.baseline import foreground
from trainers.detection.scale import restore_results

BAND = 1  # pixels of the outline, inward and outward, that follow the foreground


def model_grey(image: np.ndarray, normalize: str) -> np.ndarray:
    """HxW float32: the mean of the image's channels as a model with this `normalize` mode sees them."""
    return apply(image, normalization(image, normalize)).mean(axis=2, dtype=np.float32)


def to_image(
    results: list[dict], seen_shape: tuple[int, int], image: np.ndarray, normalize: str, mode: str
) -> list[dict]:
    """COCO results predicted on `image` as the model saw it (`seen_shape`: its height and width, shrunk to
    its objects or not) mapped back to the image's own pixels and refined by `mode`: the last step of
    predict_image and of the served detector alike."""
    shape = image.shape[:2]
    results = results if tuple(seen_shape) == shape else restore_results(results, seen_shape, shape)
    if mode == "off":
        return results
    return refine_results(results, model_grey(image, normalize), mode, seen_shape[0] / shape[0])


def refine_results(results: list[dict], grey: np.ndarray, mode: str, scale: float = 1.0) -> list[dict]:
    """COCO results on an image whose grey model input (HxW, as the model saw it, before any shrinking to
    its objects) is `grey`, with their masks refined by `mode` (off: as they are). `scale`: the factor the
    image was shrunk by before the model saw it (trainers/detection/scale.py); the band is BAND pixels of
    the model's input, so ceil(BAND / scale) of the image's."""
    if mode == "off" or not results:
        return results
    fg = foreground(grey)
    band = math.ceil(BAND / scale - 1e-9)  # 1e-9: a scale of 1/3 read from shapes is still 3 px
    return [_refined(result, fg, band) for result in results]


def _refined(result: dict, fg: np.ndarray, band: int) -> dict:
    height, width = fg.shape
    x, y, w, h = result["bbox"]
    x0, x1 = max(int(np.floor(x)) - band - 1, 0), min(int(np.ceil(x + w)) + band + 1, width)
    y0, y1 = max(int(np.floor(y)) - band - 1, 0), min(int(np.ceil(y + h)) + band + 1, height)
    if x1 <= x0 or y1 <= y0:
        return result
    slab = decode_columns(result["segmentation"], x0, x1)
    mask = slab[y0:y1]
    if not mask.any():
        return result
    near = ndimage.binary_dilation(mask, iterations=band)
    core = ndimage.binary_erosion(mask, iterations=band)
    new = ndimage.binary_fill_holes((near & fg[y0:y1, x0:x1]) | core)
    pieces, count = ndimage.label(new)
    if count > 1:
        new = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    if not new.any():
        return result
    slab[y0:y1] = new
    # The box grows to hold a mask that grew past it (the model's box otherwise): boxes enclose masks.
    rows, cols = np.flatnonzero(new.any(axis=1)) + y0, np.flatnonzero(new.any(axis=0)) + x0
    left, top = min(x, float(cols[0])), min(y, float(rows[0]))
    right, bottom = max(x + w, float(cols[-1] + 1)), max(y + h, float(rows[-1] + 1))
    box = [left, top, right - left, bottom - top]
    return {**result, "segmentation": encode_columns(slab, x0, width), "bbox": box}


def decode_columns(rle: dict, x0: int, x1: int) -> np.ndarray:
    """Columns x0..x1-1 of an RLE mask, full height (H x (x1 - x0) bool): COCO RLEs run down the columns,
    so these are one stretch of the runs."""
    height = rle["size"][0]
    counts = rle_counts(rle["counts"], "mask")
    ends = np.cumsum(counts)
    lo, hi = x0 * height, x1 * height
    spans = np.clip(ends, lo, hi) - np.clip(ends - counts, lo, hi)
    values = np.arange(counts.size) % 2 == 1  # runs alternate, background first
    return np.repeat(values, spans).reshape(x1 - x0, height).T.copy()


def encode_columns(slab: np.ndarray, x0: int, width: int) -> dict:
    """The COCO RLE (compressed, str counts) of a width-wide mask that is empty outside columns
    x0..x0 + slab width - 1, whose columns there are `slab` (full height)."""
    height = slab.shape[0]
    flat = slab.T.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs.insert(0, 0)  # the counts start with a background run
    runs[0] += x0 * height
    after = (width - x0 - slab.shape[1]) * height
    if len(runs) % 2:  # ends on background
        runs[-1] += after
    elif after:
        runs.append(after)
    rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
