"""The filters applied to Mask R-CNN detections after the network: per-class score thresholds
(`class_score_thresh`) and a minimum mask area (`mask_min_area`).

`filter_output` / `filter_results` apply them wherever a detector's output becomes results (the one
inference path, trainers/detection/inference.py), after the model's own post-processing, exactly as the
thresholds search applies them to cached predictions (trainers/detection/thresholds.py); with the
defaults ((), 0) they change nothing.
"""

import numpy as np
import torch
from pycocotools import mask as mask_utils

from datasets.errors import UserError

# What a detector's post-processing is made of: torchvision's (score threshold, NMS, top-k) and ours.
POSTPROCESS_FIELDS = (
    "box_score_thresh",
    "class_score_thresh",
    "box_nms_thresh",
    "box_detections_per_img",
    "mask_min_area",
)


def class_thresholds(thresholds, categories) -> np.ndarray | None:
    """class_score_thresh as a lookup table indexed by label (category id), or None when it is empty.
    UserError naming the field and the categories when there is not one threshold per category."""
    thresholds = tuple(thresholds)
    if not thresholds:
        return None
    if categories is None:
        raise ValueError("class_score_thresh needs the model's categories to map labels to thresholds")
    if len(thresholds) != len(categories):
        names = ", ".join(str(c["name"]) for c in categories)
        raise UserError(
            f"class_score_thresh: {len(thresholds)} threshold(s) {thresholds} for {len(categories)} "
            f"categories ({names}); give one per category, in this order, or none"
        )
    ids = [int(c["id"]) for c in categories]
    # Labels outside the categories (none expected) get -inf: only box_score_thresh applies to them.
    table = np.full(max(ids) + 1, -np.inf)
    table[ids] = thresholds
    return table


def keep_detections(
    labels: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray | None,
    class_score_thresh,
    mask_min_area: int,
    categories,
) -> np.ndarray:
    """Which detections survive the filters after the model: a score of at least its class's threshold
    (class_score_thresh, in category order; empty = no extra threshold) and a mask of at least
    mask_min_area pixels (areas None: no masks, the area filter does not apply)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    table = class_thresholds(class_score_thresh, categories)
    if table is not None and len(labels):
        inside = labels < len(table)
        threshold = np.where(inside, table[np.where(inside, labels, 0)], -np.inf)
        keep &= np.asarray(scores) >= threshold
    if mask_min_area > 0 and areas is not None:
        keep &= np.asarray(areas) >= mask_min_area
    return keep


def filter_output(
    output: dict[str, torch.Tensor], cfg, categories, mask_threshold: float = 0.5
) -> dict[str, torch.Tensor]:
    """One torchvision detection output (boxes, labels, scores, masks N x 1 x H x W soft) without the
    detections that cfg's class_score_thresh and mask_min_area drop; the mask area is the pixel count of
    the mask binarised at `mask_threshold`, as the results store it. The output itself when nothing is set."""
    if not cfg.class_score_thresh and not cfg.mask_min_area:
        return output
    areas = None
    if cfg.mask_min_area and "masks" in output:
        areas = (output["masks"][:, 0] >= mask_threshold).sum(dim=(1, 2)).cpu().numpy()
    keep = keep_detections(
        output["labels"].cpu().numpy(),
        output["scores"].cpu().numpy(),
        areas,
        cfg.class_score_thresh,
        cfg.mask_min_area,
        categories,
    )
    if keep.all():
        return output
    index = torch.from_numpy(np.flatnonzero(keep))
    return {k: v[index.to(v.device)] if torch.is_tensor(v) else v for k, v in output.items()}


def filter_results(results: list[dict], cfg, categories) -> list[dict]:
    """COCO result dicts (e.g. stitched tiled inference) without those cfg's filters drop (see
    filter_output); a result without a segmentation has no mask area and passes mask_min_area."""
    if not cfg.class_score_thresh and not cfg.mask_min_area or not results:
        return results
    areas = None
    if cfg.mask_min_area:
        areas = np.array(
            [mask_utils.area(r["segmentation"]) if "segmentation" in r else np.inf for r in results]
        )
    keep = keep_detections(
        [r["category_id"] for r in results],
        [r["score"] for r in results],
        areas,
        cfg.class_score_thresh,
        cfg.mask_min_area,
        categories,
    )
    return [r for r, k in zip(results, keep, strict=True) if k]
