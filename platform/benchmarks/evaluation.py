"""Benchmark of the COCO evaluators: pycocotools' COCOeval against faster-coco-eval (what
trainers/evaluation.py runs) on dense images made from the sample's real masks, and the Kaggle metric's
time on the same predictions (`python -m platform.bench eval`)."""

import copy
import time
from pathlib import Path

import cv2
import faster_coco_eval
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval as ReferenceCOCOeval

from datasets.instances import SAMPLE_DATA, instance_masks, quiet_pycocotools, read_records
from datasets.records import image_size
from trainers.evaluation import (
    IOU_TYPES,
    coco_summary,
    kaggle_by_cutoff,
    kaggle_metrics,
    max_dets_list,
    run_cocoeval,
)


def dense_case(
    data: str | Path = SAMPLE_DATA, images: int = 4, grid: int = 3, seed: int = 0
) -> tuple[COCO, list[dict]]:
    """Dense ground truth and predictions made from real masks, for timing evaluators.

    Each image is a grid x grid mosaic of the sample's densest images' instance masks (hundreds of nuclei).
    Predictions: every mask kept (90 %), dilated, eroded or unchanged by one pixel, plus false positives
    (10 %: masks moved to a random place in their tile), all with random scores.
    """

    rng = np.random.default_rng(seed)
    records = sorted(read_records(data), key=lambda r: -len(r.mask_paths))[: images * grid * grid]
    tile_h = max(image_size(r.image_path)[0] for r in records)
    tile_w = max(image_size(r.image_path)[1] for r in records)
    height, width = grid * tile_h, grid * tile_w
    kernel = np.ones((3, 3), np.uint8)
    annotations, results = [], []

    def add(masks: list[np.ndarray], image_id: int, y: int, x: int, out: list[dict]) -> None:
        masks = [m for m in masks if m.any()]  # erosion can empty a tiny mask
        if not masks:
            return
        canvas = np.zeros((height, width, len(masks)), np.uint8, order="F")
        canvas[y : y + masks[0].shape[0], x : x + masks[0].shape[1]] = np.stack(masks, axis=2)
        for rle in mask_utils.encode(canvas):
            rle["counts"] = rle["counts"].decode()
            entry = {"image_id": image_id, "category_id": 1, "segmentation": rle}
            entry["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
            if out is annotations:
                entry.update(id=len(annotations) + 1, area=float(mask_utils.area(rle)), iscrowd=0)
            else:
                entry["score"] = float(rng.random())
            out.append(entry)

    for image_index in range(images):
        for position in range(grid * grid):
            record = records[(image_index * grid * grid + position) % len(records)]
            truth = list(instance_masks(record, image_size(record.image_path))[0].astype(np.uint8))
            predicted = []
            for mask in truth:
                if rng.random() < 0.9:  # found, its outline exact or one pixel off
                    outline = (mask, cv2.dilate(mask, kernel), cv2.erode(mask, kernel))
                    predicted.append(outline[rng.integers(3)])
                if rng.random() < 0.1:  # a false positive: the same shape elsewhere in the tile
                    shift = (int(rng.integers(mask.shape[0])), int(rng.integers(mask.shape[1])))
                    predicted.append(np.roll(mask, shift, axis=(0, 1)))
            y, x = (position // grid) * tile_h, (position % grid) * tile_w
            add(truth, image_index + 1, y, x, annotations)
            add(predicted, image_index + 1, y, x, results)
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i + 1, "height": height, "width": width} for i in range(images)],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    with quiet_pycocotools():
        gt.createIndex()
    return gt, results


def benchmark_evaluators(
    data: str | Path = SAMPLE_DATA, images: int = 4, grid: int = 3, max_dets: int = 1000
) -> dict:
    """Time pycocotools' COCOeval against run_cocoeval (faster-coco-eval) on dense_case images, bbox + segm,
    results loading, evaluate and accumulate; print and return the seconds and the largest difference
    between their coco_summary numbers. Also times kaggle_metrics and kaggle_by_cutoff on the same
    predictions."""

    gt, results = dense_case(data, images, grid)
    out = {"images": images, "instances": len(gt.anns), "detections": len(results), "max_dets": max_dets}
    print(
        f"dense case: {images} images of {gt.dataset['images'][0]['width']}x"
        f"{gt.dataset['images'][0]['height']}, {out['instances']} ground-truth instances "
        f"({out['instances'] / images:.0f} per image), {out['detections']} predictions"
    )
    started = time.perf_counter()
    reference = {}
    for iou_type in IOU_TYPES:
        with quiet_pycocotools():
            ev = ReferenceCOCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
            ev.params.maxDets = max_dets_list(max_dets)
            ev.evaluate()
            ev.accumulate()
        reference[iou_type] = coco_summary(ev)
    out["pycocotools_s"] = time.perf_counter() - started
    started = time.perf_counter()
    fast = {t: coco_summary(run_cocoeval(gt, results, t, max_dets)) for t in IOU_TYPES}
    out["faster_coco_eval_s"] = time.perf_counter() - started
    out["largest_difference"] = max(abs(fast[t][k] - v) for t in IOU_TYPES for k, v in reference[t].items())
    started = time.perf_counter()
    kaggle_metrics(gt, results)
    out["kaggle_s"] = time.perf_counter() - started
    started = time.perf_counter()
    kaggle_by_cutoff(gt, results)
    out["cutoff_curve_s"] = time.perf_counter() - started
    print(f"pycocotools:      {out['pycocotools_s']:.2f} s (bbox + segm, maxDets {max_dets})")
    print(
        f"faster-coco-eval: {out['faster_coco_eval_s']:.2f} s ({faster_coco_eval.__version__}, "
        f"{out['pycocotools_s'] / out['faster_coco_eval_s']:.1f}x faster, what run_cocoeval uses); "
        f"largest metric difference {out['largest_difference']:.2g}"
    )
    print(f"kaggle metric:    {out['kaggle_s']:.2f} s (Kaggle score + matched mask IoU)")
    print(
        f"cut-off curve:    {out['cutoff_curve_s']:.2f} s (Kaggle score at 19 cut-offs: the operating point)"
    )
    return out
