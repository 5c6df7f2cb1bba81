"""Evaluation of COCO-format predictions: the full COCO set (at a chosen max detections, per class, per IoU
threshold, without one class), the Kaggle DSB2018/Sartorius metric and the mean matched mask IoU, a
printable table, prediction with progress lines, and a timing of pycocotools against faster-coco-eval.

Every COCO number comes from COCOeval's evaluate + accumulate (faster-coco-eval's implementation of
pycocotools' algorithm, see run_cocoeval); the functions here only read its accumulated precision and
recall arrays, the way pycocotools' own `summarize` does.

Per-image error analysis (the end of the module): each image's predictions matched to its objects
(match_instances at IoU 0.5: TP, FP, FN), its Kaggle score and its own COCO AP, as table rows.
"""

import copy
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import faster_coco_eval
import numpy as np
from faster_coco_eval import COCOeval_faster as COCOeval
from pycocotools.coco import COCO
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from datasets.errors import UserError
from datasets.records import rle_ious

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
PR_IOUS = (0.5, 0.75, 0.85, 0.95)  # the foram paper's per-IoU precision-recall curves
KAGGLE_IOUS = tuple(round(0.50 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, ..., 0.95
AREAS = {"s": "small", "m": "medium", "l": "large"}


def max_dets_list(max_dets: int) -> list[int]:
    """COCOeval's maxDets: 1, 10, 100 where they do not exceed `max_dets`, and `max_dets` itself last."""
    if max_dets < 1:
        raise UserError(f"max detections: expected a positive integer, got {max_dets}")
    return sorted({m for m in (1, 10, 100) if m < max_dets} | {max_dets})


def run_cocoeval(
    gt: COCO, results: list[dict], iou_type: str, max_dets: int = 100, cat_ids: list[int] | None = None
) -> COCOeval:
    """COCOeval of `results` (COCO result dicts, RLE segmentations) against `gt`, evaluated and accumulated,
    at most `max_dets` detections per image, on the categories `cat_ids` (default all).

    Runs faster-coco-eval's COCOeval_faster: pycocotools' algorithm in C++, with the same params and the
    same accumulated arrays, 25-58x faster on images with hundreds of nuclei (`platform.bench eval`).
    tests/test_evaluation.py checks its numbers against pycocotools' own COCOeval.
    """
    fast_gt = faster_coco_eval.COCO(gt.dataset, use_deepcopy=True, print_function=_silent)
    ev = faster_coco_eval.COCOeval_faster(
        fast_gt, _load_results(fast_gt, results), iou_type, print_function=_silent
    )
    ev.params.maxDets = max_dets_list(max_dets)
    if cat_ids is not None:
        ev.params.catIds = sorted(cat_ids)
    ev.evaluate()
    ev.accumulate()
    return ev


def _silent(*args, **kwargs) -> None:
    pass


def _load_results(gt: faster_coco_eval.COCO, results: list[dict]) -> faster_coco_eval.COCO:
    # loadRes fails on an empty list; an empty result set is a valid one that scores 0.
    # loadRes also adds keys to the dicts it is given: give it copies, the caller's results stay as made.
    if results:
        return gt.loadRes(copy.deepcopy(results))
    return faster_coco_eval.COCO({**gt.dataset, "annotations": []}, print_function=_silent)


def coco_stat(
    ev: COCOeval,
    kind: str,
    max_dets: int,
    iou: float | None = None,
    area: str = "all",
    cat_index: int | None = None,
) -> float:
    """One number from an accumulated COCOeval, as pycocotools' summarize computes it: "AP" is the mean of
    precision over recall points, IoU thresholds (or the one `iou`) and categories (or the one at position
    `cat_index` of params.catIds); "AR" the mean of recall over IoU thresholds and categories. -1 when no
    entry is defined (no ground truth there)."""
    p = ev.params
    values = ev.eval["precision" if kind == "AP" else "recall"]  # [T, R, K, A, M] or [T, K, A, M]
    values = values[..., p.areaRngLbl.index(area), p.maxDets.index(max_dets)]
    if iou is not None:
        t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - iou)))
        if not np.isclose(p.iouThrs[t], iou):
            raise ValueError(f"IoU {iou} is not one of the evaluated thresholds {list(p.iouThrs)}")
        values = values[t : t + 1]
    if cat_index is not None:
        values = values[..., cat_index : cat_index + 1]
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def coco_summary(ev: COCOeval) -> dict[str, float]:
    """AP (IoU .50:.95), AP50, AP75, AP85, AP95, APs/m/l, AR1, AR10, AR100 and AR<max_dets>, ARs/m/l, all at
    the evaluation's max detections (its last maxDets) unless the name says otherwise; -1 = undefined."""
    max_dets = ev.params.maxDets[-1]
    out = {"AP": coco_stat(ev, "AP", max_dets)}
    out.update({f"AP{round(iou * 100)}": coco_stat(ev, "AP", max_dets, iou=iou) for iou in PR_IOUS})
    out.update({f"AP{s}": coco_stat(ev, "AP", max_dets, area=area) for s, area in AREAS.items()})
    out.update({f"AR{m}": coco_stat(ev, "AR", m) for m in ev.params.maxDets})
    out.update({f"AR{s}": coco_stat(ev, "AR", max_dets, area=area) for s, area in AREAS.items()})
    return out


def per_class_ap(ev: COCOeval, gt: COCO) -> dict[str, float]:
    """AP (IoU .50:.95) of each evaluated category, by name; -1 for a category without ground truth."""
    max_dets = ev.params.maxDets[-1]
    return {
        gt.cats[cat_id]["name"]: coco_stat(ev, "AP", max_dets, cat_index=k)
        for k, cat_id in enumerate(ev.params.catIds)
    }


def category_ids_without(categories, name: str) -> list[int]:
    """The ids of every category except the one called `name`; UserError listing the names if unknown."""
    names = [c["name"] for c in categories]
    if name not in names:
        raise UserError(f"--exclude-class: unknown class '{name}'; valid: {', '.join(names)}")
    if len(names) == 1:
        raise UserError(f"--exclude-class: '{name}' is the only class; nothing would be left to evaluate")
    return [c["id"] for c in categories if c["name"] != name]


def metric_key(name: str) -> str:
    """A class name as a metric-key part: MLflow and Tune accept letters, digits, _ - . in keys."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def coco_report(
    gt: COCO, results: list[dict], max_dets: int = 100, exclude_class: str | None = None
) -> tuple[dict[str, float], dict[str, COCOeval]]:
    """Every COCO metric for bbox and segm, and the two COCOevals (for precision-recall curves).

    Keys: `{bbox,segm}_{stat}` for coco_summary's stats; `{type}_AP_class_{name}` per class; with
    `exclude_class`, also `{type}_{stat}_without_{name}`, evaluated on the other classes only (their ground
    truth and their detections). Undefined values (-1 in pycocotools: no ground truth in that class or
    area range) read 0, so that every key is a number that Tune and MLflow can use.
    """
    keep = category_ids_without(gt.dataset["categories"], exclude_class) if exclude_class else None
    metrics, evals = {}, {}
    for iou_type in IOU_TYPES:
        ev = evals[iou_type] = run_cocoeval(gt, results, iou_type, max_dets)
        metrics.update({f"{iou_type}_{k}": v for k, v in coco_summary(ev).items()})
        metrics.update({f"{iou_type}_AP_class_{metric_key(n)}": v for n, v in per_class_ap(ev, gt).items()})
        if keep is not None:
            without = coco_summary(run_cocoeval(gt, results, iou_type, max_dets, keep))
            suffix = f"without_{metric_key(exclude_class)}"
            metrics.update({f"{iou_type}_{k}_{suffix}": v for k, v in without.items()})
    return {k: max(v, 0.0) for k, v in metrics.items()}, evals


def match_instances(ious, threshold: float) -> list[tuple[int, int]]:
    """A one-to-one matching of predictions (rows of `ious`, a dense or scipy sparse matrix) to ground-truth
    objects (columns) among the pairs with IoU > threshold: as many pairs as possible, and of those
    matchings the largest total IoU.

    Solved as an assignment problem with weight n + IoU per allowed pair (n = min(rows, cols) + 1): a
    matching with one more pair always weighs more (at most n - 1 pairs, each IoU <= 1), so the heaviest
    matching has the most pairs first and the most IoU second. With t >= 0.5 and non-overlapping masks on
    either side each object has at most one candidate, and every definition agrees; this one also settles
    overlapping Mask R-CNN outputs without depending on their order. Groups of predictions and objects
    that no allowed pair joins are independent: a lone pair is matched as it is, and only the groups of
    several are solved, each on its own (a mosaic's thousands of objects are thousands of small problems).
    """
    pairs = sparse.coo_matrix(ious)
    allowed = pairs.data > threshold
    rows, cols, values = pairs.row[allowed], pairs.col[allowed], pairs.data[allowed]
    if not len(rows):
        return []
    n_pred, n_gt = pairs.shape
    graph = sparse.coo_matrix((np.ones(len(rows)), (rows, n_pred + cols)), shape=(n_pred + n_gt,) * 2)
    group = sparse.csgraph.connected_components(graph, directed=False)[1][rows]
    lone = np.bincount(group)[group] == 1
    matched = list(zip(rows[lone].tolist(), cols[lone].tolist(), strict=True))
    for g in np.unique(group[~lone]):
        mine = group == g
        row_ids, r = np.unique(rows[mine], return_inverse=True)
        col_ids, c = np.unique(cols[mine], return_inverse=True)
        weight = np.zeros((len(row_ids), len(col_ids)))
        weight[r, c] = min(weight.shape) + 1 + values[mine]
        chosen = linear_sum_assignment(weight, maximize=True)
        matched += [(int(row_ids[i]), int(col_ids[j])) for i, j in zip(*chosen, strict=True) if weight[i, j]]
    return sorted(matched)


def kaggle_image_score(ious: np.ndarray) -> float:
    """One image's Kaggle DSB2018/Sartorius score: the mean over t in 0.50, 0.55, ..., 0.95 of
    TP / (TP + FP + FN), TP = pairs of match_instances(ious, t), FP = unmatched predictions, FN = unmatched
    ground truth. `ious` is predictions x ground truth. No ground truth and no prediction scores 1."""
    n_pred, n_gt = ious.shape
    if n_pred == 0 and n_gt == 0:
        return 1.0
    scores = []
    for t in KAGGLE_IOUS:
        tp = len(match_instances(ious, t))
        scores.append(tp / (n_pred + n_gt - tp))  # TP + FP + FN = TP + (P - TP) + (G - TP)
    return float(np.mean(scores))


def per_image_masks(gt: COCO, results: list[dict], score_threshold: float):
    """(image id, its result dicts scoring at least `score_threshold`, its ground-truth RLEs without crowd
    regions) for every image of `gt`, in id order: what the Kaggle metric and the error analysis match."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_threshold:
            by_image.setdefault(r["image_id"], []).append(r)
    for image_id in gt.getImgIds():
        truth = [gt.annToRLE(a) for a in gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        yield image_id, by_image.get(image_id, []), truth


def kaggle_metrics(gt: COCO, results: list[dict], score_threshold: float = 0.5) -> dict[str, float]:
    """The Kaggle metric and the mean matched mask IoU of `results` against `gt`, class-agnostic (as in
    both competitions), on the predictions scoring at least `score_threshold`; crowd regions are left out.

    kaggle_mAP: the mean over images of kaggle_image_score.
    matched_mask_IoU: the mean IoU of the pairs matched at IoU > 0.5 (match_instances(ious, 0.5)), pooled
    over all images (each matched object counts once, whatever its image); unmatched predictions and
    objects do not enter it (they cost kaggle_mAP instead). 0 when nothing is matched.
    """
    scores, matched = [], []
    for _, predicted, truth in per_image_masks(gt, results, score_threshold):
        ious = rle_ious([r["segmentation"] for r in predicted], truth)
        scores.append(kaggle_image_score(ious))
        pairs = match_instances(ious, 0.5)
        if pairs:
            rows, cols = np.array(pairs).T
            matched += np.asarray(ious[rows, cols]).ravel().tolist()
    return {
        "kaggle_mAP": float(np.mean(scores)) if scores else 0.0,
        "matched_mask_IoU": float(np.mean(matched)) if matched else 0.0,
    }


# The cut-offs a detector's operating point is chosen among (MaskRCNNConfig.choose_score_threshold): 0.05 to
# 0.95 in steps of 0.05. A coarse grid: it is chosen on a handful of validation images, and finer steps
# would fit their noise.
SCORE_CUTOFFS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def kaggle_by_cutoff(gt: COCO, results: list[dict], cutoffs=SCORE_CUTOFFS) -> dict[float, float]:
    """kaggle_metrics(gt, results, cut)["kaggle_mAP"] for every cut of `cutoffs`, the mask IoUs computed
    once per image: a higher cut only drops rows (predictions) of the lower one's IoU matrix."""
    per_cut: dict[float, list[float]] = {cut: [] for cut in cutoffs}
    for _, predicted, truth in per_image_masks(gt, results, min(cutoffs)):
        ious = rle_ious([r["segmentation"] for r in predicted], truth)
        scores = np.asarray([r["score"] for r in predicted], dtype=np.float64)
        for cut in cutoffs:
            per_cut[cut].append(kaggle_image_score(ious[scores >= cut]))
    return {cut: float(np.mean(values)) if values else 0.0 for cut, values in per_cut.items()}


def best_cutoff(curve: dict[float, float]) -> float:
    """The cut-off of kaggle_by_cutoff's `curve` with the highest score; among equal ones (within 1e-9) the
    nearest to 0.5, the fixed cut-off the Kaggle metric used before (a model that never changes its answer
    keeps it)."""
    top = max(curve.values())
    return min((cut for cut, value in curve.items() if value >= top - 1e-9), key=lambda c: (abs(c - 0.5), c))


def format_table(metrics: dict[str, float]) -> str:
    """bbox and segm metrics side by side, one row per statistic, then every other metric."""
    rows: dict[str, dict[str, float]] = {}
    other = {}
    for key, value in metrics.items():
        kind, _, name = key.partition("_")
        if kind in IOU_TYPES:
            rows.setdefault(name, {})[kind] = value
        else:
            other[key] = value
    width = max(len(name) for name in [*rows, *other, "metric"])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{t:>6}" for t in IOU_TYPES)]
    for name, values in rows.items():
        cells = [f"{values[t]:6.3f}" if t in values else f"{'-':>6}" for t in IOU_TYPES]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    lines += [f"{key:<{width}}  {value:6.3f}" for key, value in other.items()]
    return "\n".join(lines)


def coco_metrics(gt: COCO, results: list[dict], max_dets: int = 100) -> dict[str, float]:
    """bbox_* and segm_* COCO metrics (AP, AP50, AP75, AR100, per class, ...: trainers/evaluation.py's
    coco_report) for `results` against `gt`, AP and AR at most `max_dets` detections per image."""
    return coco_report(gt, results, max_dets)[0]


def score_results(
    gt: COCO, results: list[dict], max_dets: int = 100, score_threshold: float = 0.5
) -> dict[str, float]:
    """COCO metrics (every detection ranked) and the Kaggle DSB2018/Sartorius metric (kaggle_mAP,
    matched_mask_IoU, of the detections scoring at least `score_threshold`: the objects a model reports)
    of COCO result dicts from any inference path (whole images, tiles)."""
    return {**coco_metrics(gt, results, max_dets), **kaggle_metrics(gt, results, score_threshold)}


# ---- per-image error analysis: which images a model gets wrong, and how --------------------------------

ERROR_IOU = 0.5  # a prediction is a true positive of the per-image table when it matches at IoU > this


@dataclass
class ImageOutcome:
    """One image's predictions (those scoring >= the threshold) matched one-to-one to its ground truth
    (crowd regions left out) by match_instances at ERROR_IOU."""

    image_id: int
    predicted: list[dict]  # RLEs
    truth: list[dict]  # RLEs
    ious: sparse.csr_matrix  # predictions x ground truth (datasets.records.rle_ious)
    pairs: list[tuple[int, int]]  # (prediction, ground truth) indices of the true positives

    @property
    def false_positives(self) -> list[int]:
        matched = {p for p, _ in self.pairs}
        return [i for i in range(len(self.predicted)) if i not in matched]

    @property
    def false_negatives(self) -> list[int]:
        matched = {t for _, t in self.pairs}
        return [j for j in range(len(self.truth)) if j not in matched]


def image_outcomes(gt: COCO, results: list[dict], score_threshold: float = 0.5) -> list[ImageOutcome]:
    """Every image of `gt` (in its id order) with its predictions from `results` matched to its objects."""
    outcomes = []
    for image_id, found, truth in per_image_masks(gt, results, score_threshold):
        predicted = [r["segmentation"] for r in found]
        ious = rle_ious(predicted, truth)
        outcomes.append(ImageOutcome(image_id, predicted, truth, ious, match_instances(ious, ERROR_IOU)))
    return outcomes


def per_image_ap(gt: COCO, results: list[dict], iou_type: str = "segm", max_dets: int = 100) -> dict:
    """COCO AP (IoU .50:.95) of each image alone, by image id: COCOeval with params.imgIds set to that one
    image (the ground truth and the results loaded once for all). -1 where it is undefined (no ground
    truth in the image)."""
    fast_gt = faster_coco_eval.COCO(gt.dataset, use_deepcopy=True, print_function=_silent)
    detections = _load_results(fast_gt, results)
    out = {}
    for image_id in gt.getImgIds():
        ev = faster_coco_eval.COCOeval_faster(fast_gt, detections, iou_type, print_function=_silent)
        ev.params.imgIds = [image_id]
        ev.params.maxDets = max_dets_list(max_dets)
        ev.evaluate()
        ev.accumulate()
        out[image_id] = coco_stat(ev, "AP", max_dets)
    return out


def per_image_table(
    gt: COCO, results: list[dict], outcomes: list[ImageOutcome], max_dets: int = 100
) -> list[dict]:
    """One row per image: id, name (the image file's stem), objects, predictions scoring >= the outcomes'
    threshold, segm AP (all predictions; "" when undefined), Kaggle score and TP/FP/FN at ERROR_IOU."""
    ap = per_image_ap(gt, results, "segm", max_dets)
    rows = []
    for o in outcomes:
        rows.append(
            {
                "image_id": o.image_id,
                "image": Path(gt.imgs[o.image_id]["file_name"]).stem,
                "n_true": len(o.truth),
                "n_pred": len(o.predicted),
                "segm_AP": round(ap[o.image_id], 4) if ap[o.image_id] > -1 else "",
                "kaggle": round(kaggle_image_score(o.ious), 4),
                "TP": len(o.pairs),
                "FP": len(o.false_positives),
                "FN": len(o.false_negatives),
            }
        )
    return rows


def worst_rows(rows: list[dict], n: int) -> list[dict]:
    """The `n` rows of lowest Kaggle score (ties: most errors first)."""
    return sorted(rows, key=lambda r: (r["kaggle"], -(r["FP"] + r["FN"])))[:n]


def rows_csv(rows: list[dict]) -> str:
    """Rows of equal keys as CSV text, a header line first ("" for no rows)."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def rows_table(rows: list[dict]) -> str:
    """Rows of equal keys as aligned text columns, floats to 3 decimals."""
    if not rows:
        return ""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    columns = list(rows[0])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


COMPARED = ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "kaggle_mAP", "matched_mask_IoU")


def format_comparison(named: dict[str, dict[str, float]], keys: tuple[str, ...] = COMPARED) -> str:
    """Metric sets side by side, one row each (e.g. the model and the classical baseline); a key a set
    lacks shows as "-"."""
    width = max(len(name) for name in named)
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>{max(len(k), 6)}}" for k in keys)]
    for name, metrics in named.items():
        cells = [
            f"{metrics[k]:>{max(len(k), 6)}.3f}" if k in metrics else f"{'-':>{max(len(k), 6)}}" for k in keys
        ]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
