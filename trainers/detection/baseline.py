"""The classical baseline scored beside every detector (the config field `baseline`): Otsu's threshold on the
grey image and connected components, optionally with a watershed split of touching objects; its instances
as COCO results, so that the same evaluation scores it and the model on the same images.

It is never a model: nothing here is trained, logged as a model or registered. It answers one question
beside each number a model gets: did learning beat a threshold? (DESIGN.md, "Measuring model quality".)

COCO AP needs a ranking: with one score for all, AP would depend on the order the instances happen to be
listed in (image by image, then label order), not on their quality. An instance's score is its solidity
(area / convex hull area): a nucleus is nearly convex, while touching nuclei that the threshold merged, and
ragged noise, are not, and those are the baseline's typical errors. On DSB2018's 176 validation images the
ranking lifts segm AP from 0.20 (every score 1.0) to 0.31; the Kaggle metric counts matches among all
predictions scoring >= 0.5 and does not rank them: 0.416 there with either score.
"""

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops
from skimage.segmentation import watershed

from datasets.instances import InstanceDataset, coco_ground_truth, encode_masks
from datasets.records import load_image
from trainers.evaluation import score_results

METHODS = ("otsu", "otsu-watershed")  # the config's BASELINES less "off"
MIN_AREA = 10  # pixels; smaller components are specks of noise (the bundled sample's smallest nucleus: 21)
# Pixels between watershed markers. Chosen on the 24 bundled sample images (3, 5, 7, 9 px: Kaggle 0.39,
# 0.49, 0.51, 0.50), not on the validation images: closer markers cut single nuclei into pieces.
PEAK_MIN_DISTANCE = 7
ENCODE_CHUNK = 64  # masks made full-size at a time for RLE encoding: hundreds per image would be GBs


def foreground(grey: np.ndarray) -> np.ndarray:
    """The object pixels of a grey image: above Otsu's threshold, or below it when the background is bright
    (the median pixel, background in a sparse image, is above the threshold). A flat image has none."""
    if grey.min() == grey.max():
        return np.zeros(grey.shape, dtype=bool)
    threshold = threshold_otsu(grey)
    bright = grey > threshold
    return ~bright if np.median(grey) > threshold else bright


def split_touching(mask: np.ndarray) -> np.ndarray:
    """A label image of `mask` with touching round objects split: watershed of the negated distance to the
    background, from one marker per local maximum of that distance at least PEAK_MIN_DISTANCE apart."""
    distance = ndimage.distance_transform_edt(mask)
    components = label(mask)
    # One maximum per component at least: labels= finds peaks within each component separately.
    peaks = peak_local_max(distance, min_distance=PEAK_MIN_DISTANCE, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


def label_objects(image: np.ndarray, method: str) -> np.ndarray:
    """The baseline's label image (0 = background, 1..N = objects) of an HxWx3 (or HxW) image."""
    if method not in METHODS:
        raise ValueError(f"baseline: unknown method {method!r}; valid: {', '.join(METHODS)}")
    grey = image.mean(axis=2) if image.ndim == 3 else image.astype(np.float64)
    mask = foreground(grey)
    regions = split_touching(mask) if method == "otsu-watershed" else mask
    # label() numbers connected pixels of equal value: a watershed basin cut in two becomes two objects.
    labels = label(regions, connectivity=1)  # 4-connected: nuclei touching at a corner stay apart
    small = np.bincount(labels.ravel()) < MIN_AREA
    small[0] = False
    labels[small[labels]] = 0
    return label(labels, connectivity=1)  # numbered 1..N again


def image_results(labels: np.ndarray, image_id: int, category_id: int) -> list[dict]:
    """COCO result dicts (RLE segmentation, bbox xywh, score = solidity) of the objects of a label image, in
    label order."""
    regions = regionprops(labels)
    results = []
    for start in range(0, len(regions), ENCODE_CHUNK):
        chunk = regions[start : start + ENCODE_CHUNK]
        ids = np.array([r.label for r in chunk])
        for region, rle in zip(chunk, encode_masks(labels[None] == ids[:, None, None]), strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": rle,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": float(region.solidity),
                }
            )
    return results


def baseline_results(records: list, method: str) -> list[dict]:
    """The baseline's COCO results on `records` (image_id = position + 1, as coco_ground_truth numbers
    them), every instance of the records' first category."""
    category_id = records[0].categories[0]["id"] if records else 1
    results = []
    for index, record in enumerate(records):
        labels = label_objects(load_image(record.image_path), method)
        results.extend(image_results(labels, index + 1, category_id))
    return results


# Scored once per validation set and method in a process: a search's trials and a run's seeds share it.
_SCORED: dict[tuple, dict[str, float]] = {}


def baseline_metrics(records: list, method: str, max_dets: int = 100, gt=None) -> dict[str, float]:
    """trainers/evaluation.score_results of the baseline on `records` (COCO bbox_* and segm_* at most
    `max_dets` detections per image, kaggle_mAP and matched_mask_IoU at score 0.5), against `gt` (default:
    the records' own ground truth). Cached in memory by records, method and max_dets."""
    key = (tuple(records), method, max_dets)
    if key not in _SCORED:
        if gt is None:
            gt = coco_ground_truth(InstanceDataset(records))
        _SCORED[key] = score_results(gt, baseline_results(records, method), max_dets)
    return dict(_SCORED[key])
