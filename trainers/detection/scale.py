"""Object-size rescaling at inference (the config field `object_diameter`, Cellpose's `diameter`): an image
whose objects are much larger than those the model trained on is shrunk until they are within its reach,
predicted, and its instances are mapped back to the image's own pixels.

Why: a detector trained from scratch on one magnification does not find objects three times the size it
saw. On DSB2018's 176 validation images the bundled training nuclei are ~15 px across, while whole groups
of the unseen images have 29, 47 and 94 px nuclei; on the 47-px group the model scored AP 0.26, Otsu 0.54.

The diameter of an image's objects is estimated without the model: the median equivalent diameter of the
Otsu components (trainers/detection/baseline.py). On the 176 images it is within 0.9-1.1x of the annotated
median diameter for every group of fluorescence images, but it underestimates (0.1-0.5x) where the
threshold breaks objects into specks (bright-field, faint images). Hence images are only ever shrunk: an
underestimate leaves the image as it is, where a wrong 2-4x upsampling would cost 4-16x the compute.

How far: objects up to REACH x the trained diameter are left alone, larger ones are shrunk to REACH x it.
First measured with the 90-epoch dsb2018_cpu model without mask refinement, on the 61 of the 176 images
that shrink (segm AP / Kaggle): shrunk to 1.0x 0.357 / 0.317, 1.3x 0.365 / 0.325, 1.6x 0.400 / 0.342,
2.0x 0.412 / 0.353, 2.5x 0.412 / 0.371 (Otsu 0.508): every halving cost mask detail, so REACH was 2.0.
The refinement (trainers/detection/refine.py, its band as deep as the image was shrunk) gives the detail
back, and then finding the objects nearer the trained size wins. On all 176 images, with TTA flips and
each seed's chosen cut-off (segm AP / Kaggle; the 27 images of 45-50 px nuclei were at 0.30-0.35 Kaggle
against Otsu + watershed's 0.54):
    REACH      2.0            1.5            1.25           1.0
    seed 1     0.358 / 0.419  0.364 / 0.431  0.359 / 0.430  0.349 / 0.428
    seed 0     -              0.357 / 0.437
REACH 2.0 with the 1-px band of before: seed 1 0.356 / 0.415, seed 0 0.359 / 0.425. Chosen on those 176
images (#19's validation set, never trained on); other unseen images are the final check.
"""

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.transform import rescale

from datasets.measure import grey_intensity
from datasets.records import patch_rle
from trainers.detection.baseline import label_objects

REACH = 1.5  # objects up to this many times the trained diameter are found as they are (see above)
MIN_SCALE = 0.1  # at most 10x smaller: a bound on how far one estimate can move the image
ESTIMATE_SIDE = 2048  # the estimate looks at a central crop at most this big: bounded memory on mosaics
MASK_LEVEL = 0.5  # a mask pixel is kept where the bilinearly upsampled small mask reaches this


def estimate_diameter(image: np.ndarray) -> float:
    """The median equivalent diameter (pixels) of the Otsu components of an HxW or HxWxC image (a central
    crop of at most ESTIMATE_SIDE pixels a side); 0.0 when there are none."""
    height, width = image.shape[:2]
    top, left = max(0, (height - ESTIMATE_SIDE) // 2), max(0, (width - ESTIMATE_SIDE) // 2)
    crop = image[top : top + ESTIMATE_SIDE, left : left + ESTIMATE_SIDE]
    areas = np.bincount(label_objects(grey_intensity(crop), "otsu").ravel())[1:]
    return float(np.median(np.sqrt(areas * 4 / np.pi))) if areas.size else 0.0


def inference_scale(image: np.ndarray, trained_diameter: float) -> float:
    """The factor to resize `image` by before inference: REACH x trained / estimated diameter when the
    estimate is larger than REACH x the trained one (at least MIN_SCALE), else 1.0 (0 = never rescale)."""
    if trained_diameter <= 0:
        return 1.0
    reach = REACH * trained_diameter
    estimated = estimate_diameter(image)
    return 1.0 if estimated <= reach else max(MIN_SCALE, reach / estimated)


def fit_to_model(image: np.ndarray, trained_diameter: float) -> np.ndarray:
    """`image` itself when its objects are within the model's reach (or `trained_diameter` is 0), else the
    image shrunk by inference_scale; predictions on a shrunk one go back through restore_results."""
    factor = inference_scale(image, trained_diameter)
    return image if factor == 1.0 else rescale_image(image, factor)


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """`image` resized by `scale` (anti-aliased, float32, its value range kept: normalisation comes after)."""
    resized = rescale(
        image.astype(np.float32, copy=False),
        scale,
        order=1,
        anti_aliasing=scale < 1,
        preserve_range=True,
        channel_axis=2 if image.ndim == 3 else None,
    )
    return resized.astype(np.float32, copy=False)


def restore_results(results: list[dict], small_shape: tuple[int, int], shape: tuple[int, int]) -> list[dict]:
    """COCO results predicted on an image resized to `small_shape`, mapped back to its `shape` (height,
    width): masks bilinearly upsampled (pixel centres aligned as in the resize) and cut at MASK_LEVEL,
    boxes and areas from the upsampled masks; results whose mask vanishes are dropped."""
    height, width = shape
    step_y, step_x = small_shape[0] / height, small_shape[1] / width
    restored = []
    for result in results:
        small = mask_utils.decode(result["segmentation"])
        rows, cols = np.flatnonzero(small.any(axis=1)), np.flatnonzero(small.any(axis=0))
        if not rows.size:
            continue
        # Original pixels whose centres fall within one small pixel of the mask's extent.
        y0, y1 = _span(rows[0], rows[-1], step_y, height)
        x0, x1 = _span(cols[0], cols[-1], step_x, width)
        ys = (np.arange(y0, y1) + 0.5) * step_y - 0.5
        xs = (np.arange(x0, x1) + 0.5) * step_x - 0.5
        grid = np.meshgrid(ys, xs, indexing="ij")
        patch = ndimage.map_coordinates(small.astype(np.float32), grid, order=1, mode="nearest") >= MASK_LEVEL
        if not patch.any():
            continue
        rle = patch_rle(patch, x0, y0, height, width)
        restored.append({**result, "segmentation": rle, "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    return restored


def _span(first: int, last: int, step: float, size: int) -> tuple[int, int]:
    """The original pixels [start, stop) whose centres map within one small pixel of [first, last]."""
    start = int(np.floor((first - 1 + 0.5) / step - 0.5))
    stop = int(np.ceil((last + 1 + 0.5) / step - 0.5)) + 1
    return max(0, start), min(size, stop)
