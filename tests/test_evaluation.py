"""trainers/evaluation.py: the COCO extras agree with pycocotools run directly; the Kaggle metric and the
matched mask IoU agree with hand-computed cases and with a brute-force implementation on random masks."""

import contextlib
import copy
import io
import itertools

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from datasets.errors import UserError
from datasets.instances import InstanceDataset, coco_ground_truth, read_records
from datasets.records import rle_ious
from platform.benchmarks.evaluation import benchmark_evaluators, dense_case
from tests.helpers import SAMPLE, masks_ground_truth
from trainers.evaluation import (
    SCORE_CUTOFFS,
    best_cutoff,
    coco_report,
    coco_summary,
    format_table,
    kaggle_by_cutoff,
    kaggle_image_score,
    kaggle_metrics,
    match_instances,
    run_cocoeval,
)

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _coco(images: list[list[np.ndarray]], categories=({"id": 1, "name": "nucleus"},)) -> COCO:
    """Ground truth from binary masks, one list per image (category 1)."""
    return masks_ground_truth(images, 32, categories)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _box(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((32, 32), bool)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    return mask


def _result(image_id: int, mask: np.ndarray, score: float, category_id: int = 1) -> dict:
    rle = _rle(mask)
    return {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "score": score,
    }


# --- Kaggle metric and matched IoU: hand-computed cases ---


def test_image_scores_by_hand():
    assert kaggle_image_score(np.zeros((0, 0))) == 1.0  # nothing to find, nothing found
    assert kaggle_image_score(np.zeros((0, 2))) == 0.0  # all missed
    assert kaggle_image_score(np.zeros((3, 0))) == 0.0  # all false positives
    # one exact match, one false positive, one miss: TP / (TP + FP + FN) = 1/3 at every threshold
    assert kaggle_image_score(np.array([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(1 / 3)
    # one pair at IoU 0.72: a match for t = 0.50 .. 0.70 (5 of 10 thresholds), else 1 FP + 1 FN -> 0
    assert kaggle_image_score(np.array([[0.72]])) == pytest.approx(0.5)


def test_matching_is_maximal_not_greedy():
    """Greedy by IoU takes (0, 0) and stops at one pair; two pairs are possible: (0, 1) and (1, 0)."""
    ious = np.array([[0.9, 0.6], [0.7, 0.0]])
    assert sorted(match_instances(ious, 0.5)) == [(0, 1), (1, 0)]
    assert match_instances(ious, 0.65) == [(0, 0)]  # (0, 1) no longer allowed
    # among matchings with as many pairs, the one with the larger total IoU
    assert sorted(match_instances(np.array([[0.8, 0.6], [0.6, 0.8]]), 0.5)) == [(0, 0), (1, 1)]
    assert match_instances(np.zeros((2, 3)), 0.5) == []


def test_sparse_and_dense_ious_give_the_same_matching():
    """Groups joined by allowed pairs are solved one by one: the pairs equal one assignment over the whole
    matrix (scipy's, weights n + IoU), in count and in total IoU, on random sparse matrices."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 12, 2))
        ious = np.where(rng.random(shape) < 0.25, rng.uniform(0.3, 1.0, shape), 0.0)
        got = match_instances(sparse.csr_matrix(ious), 0.5)
        assert got == match_instances(ious, 0.5)
        assert len({i for i, _ in got}) == len({j for _, j in got}) == len(got)  # one-to-one
        assert all(ious[i, j] > 0.5 for i, j in got)
        weight = np.where(ious > 0.5, min(shape) + 1 + ious, 0.0)
        rows, cols = linear_sum_assignment(weight, maximize=True)
        whole = [(i, j) for i, j in zip(rows, cols, strict=True) if weight[i, j]]
        assert len(got) == len(whole)
        assert sum(ious[i, j] for i, j in got) == pytest.approx(sum(ious[i, j] for i, j in whole), abs=1e-12)


def test_rle_ious_equal_pycocotools_all_pairs():
    rng = np.random.default_rng(4)
    for _ in range(40):
        masks = []
        for _ in range(int(rng.integers(0, 25))):
            y, x, h, w = rng.integers(0, 30, 2).tolist() + rng.integers(1, 33, 2).tolist()  # some very wide
            masks.append(_box(y, x, h, w) if rng.random() > 0.1 else np.zeros((32, 32), bool))
        split = int(rng.integers(0, len(masks) + 1))
        a, b = [_rle(m) for m in masks[:split]], [_rle(m) for m in masks[split:]]
        got = rle_ious(a, b)
        assert got.shape == (len(a), len(b))
        if a and b:
            np.testing.assert_array_equal(got.toarray(), np.asarray(mask_utils.iou(a, b, [0] * len(b))))


def test_kaggle_metrics_on_masks_by_hand():
    """Image 1: a 10x10 object and a prediction of 10x8 inside it (IoU 0.8: matched for t = 0.50 .. 0.75,
    6 of 10 thresholds) plus a prediction below the score threshold; image 2: nothing at all (scores 1)."""
    gt = _coco([[_box(4, 4, 10, 10)], []])
    results = [_result(1, _box(4, 4, 10, 8), 0.9), _result(1, _box(20, 20, 5, 5), 0.2)]
    m = kaggle_metrics(gt, results, score_threshold=0.5)
    assert m["kaggle_mAP"] == pytest.approx((0.6 + 1.0) / 2)
    assert m["matched_mask_IoU"] == pytest.approx(0.8)
    # with the low-scoring prediction counted it is a false positive at every threshold: image 1 -> 6/10 * 1/2
    m = kaggle_metrics(gt, results, score_threshold=0.1)
    assert m["kaggle_mAP"] == pytest.approx((0.3 + 1.0) / 2)
    assert kaggle_metrics(gt, [])["matched_mask_IoU"] == 0.0


# --- Kaggle metric and matched IoU: brute force on random masks ---


def _brute_force(pred: list[np.ndarray], truth: list[np.ndarray]) -> tuple[float, list[float]]:
    """Pixel-counted IoUs; every one-to-one matching enumerated; per threshold the matching with the most
    pairs (then the largest total IoU). Returns the image score and the IoUs matched at t = 0.5."""
    ious = np.array([[(p & g).sum() / (p | g).sum() for g in truth] for p in pred], dtype=float).reshape(
        len(pred), len(truth)
    )
    matchings = [()]
    for k in range(1, min(len(pred), len(truth)) + 1):
        for rows in itertools.combinations(range(len(pred)), k):
            for cols in itertools.permutations(range(len(truth)), k):
                matchings.append(tuple(zip(rows, cols, strict=True)))
    if not pred and not truth:
        return 1.0, []
    scores, matched = [], []
    for t in np.round(np.arange(0.5, 0.96, 0.05), 2):
        valid = [m for m in matchings if all(ious[i, j] > t for i, j in m)]
        best = max(valid, key=lambda m: (len(m), sum(ious[i, j] for i, j in m)))
        scores.append(len(best) / (len(pred) + len(truth) - len(best)))
        if t == 0.5:
            matched = [ious[i, j] for i, j in best]
    return float(np.mean(scores)), matched


def test_kaggle_metrics_match_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    truth_images, results, expected, expected_matched = [], [], [], []
    for image_id in range(1, 31):
        truth = []
        for _ in range(rng.integers(0, 5)):
            y, x, h, w = rng.integers(0, 22, 2).tolist() + rng.integers(6, 11, 2).tolist()
            truth.append(_box(y, x, h, w))
        pred = []
        for mask in truth:  # found with an error of up to 1 pixel, sometimes twice (overlapping outputs)
            for _ in range(rng.integers(0, 3)):
                pred.append(np.roll(mask, tuple(rng.integers(-1, 2, 2)), axis=(0, 1)))
        for _ in range(rng.integers(0, 3)):  # false positives, possibly overlapping objects
            y, x, h, w = rng.integers(0, 24, 2).tolist() + rng.integers(3, 9, 2).tolist()
            pred.append(_box(y, x, h, w))
        truth_images.append(truth)
        results += [_result(image_id, p, float(rng.random()) * 0.5 + 0.5) for p in pred]
        score, matched = _brute_force(pred, truth)
        expected.append(score)
        expected_matched += matched
    m = kaggle_metrics(_coco(truth_images), results, score_threshold=0.5)
    assert m["kaggle_mAP"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert m["matched_mask_IoU"] == pytest.approx(np.mean(expected_matched), abs=1e-12)
    assert 0.2 < m["kaggle_mAP"] < 0.9 and len(expected_matched) > 20  # neither trivial nor hopeless


def test_kaggle_by_cutoff_equals_the_metric_at_each_cutoff():
    """The curve computes the IoUs once and drops rows per cut-off: each point must be kaggle_metrics at
    that cut-off, which the brute force above checks; scores spread over 0-1 so the cut-offs differ."""
    rng = np.random.default_rng(1)
    truth_images, results = [], []
    for image_id in range(1, 16):
        truth = [_box(*rng.integers(0, 22, 2).tolist(), *rng.integers(6, 11, 2).tolist()) for _ in range(3)]
        truth_images.append(truth)
        for mask in truth:
            shifted = np.roll(mask, tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
            results.append(_result(image_id, shifted, float(rng.random())))
        for _ in range(rng.integers(0, 4)):
            results.append(
                _result(image_id, _box(*rng.integers(0, 24, 2).tolist(), 5, 5), float(rng.random()))
            )
    gt = _coco([*truth_images, []])  # and an image without objects or predictions
    curve = kaggle_by_cutoff(gt, results)
    assert list(curve) == list(SCORE_CUTOFFS)
    for cut, value in curve.items():
        assert value == pytest.approx(kaggle_metrics(gt, results, cut)["kaggle_mAP"], abs=1e-12), cut
    assert max(curve.values()) - min(curve.values()) > 0.05  # the cut-off matters on these predictions


def test_best_cutoff_by_hand():
    assert best_cutoff({0.3: 0.4, 0.4: 0.6, 0.5: 0.5}) == 0.4
    # ties go to the cut-off nearest 0.5, then to the lower one
    assert best_cutoff({0.2: 0.6, 0.35: 0.6, 0.8: 0.6}) == 0.35
    assert best_cutoff({0.4: 0.6, 0.6: 0.6}) == 0.4
    assert best_cutoff(dict.fromkeys(SCORE_CUTOFFS, 0.0)) == 0.5  # nothing to choose between: 0.5 as before


# --- COCO extras against pycocotools used directly ---


@pytest.fixture(scope="module")
def two_classes():
    """The first 4 sample images with every third object relabelled 'sediment', and predictions: objects
    shifted by up to 2 pixels, 15 % dropped, 10 % with the wrong class, 3 false positives per image."""
    gt = coco_ground_truth(InstanceDataset(read_records(SAMPLE)[:4]))
    gt.dataset["categories"] = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "sediment"}]
    for ann in gt.dataset["annotations"]:
        ann["category_id"] = 2 if ann["id"] % 3 == 0 else 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    rng = np.random.default_rng(1)
    results = []
    for ann in gt.dataset["annotations"]:
        mask = gt.annToMask(ann)
        if rng.random() < 0.15:
            continue
        category = ann["category_id"] if rng.random() > 0.1 else 3 - ann["category_id"]
        shifted = np.roll(mask, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        results.append(_result(ann["image_id"], shifted, float(rng.random()), category))
    for image_id in gt.getImgIds():
        for _ in range(3):
            y, x = rng.integers(0, 200, 2)
            box = np.zeros((gt.imgs[image_id]["height"], gt.imgs[image_id]["width"]), bool)
            box[y : y + 12, x : x + 12] = True
            results.append(_result(image_id, box, float(rng.random()) * 0.5, int(rng.integers(1, 3))))
    return gt, results


def _direct(gt: COCO, results: list[dict], iou_type: str, **params) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        for key, value in params.items():
            setattr(ev.params, key, value)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_extras_match_direct_pycocotools(two_classes, iou_type):
    gt, results = two_classes
    metrics, evals = coco_report(gt, results, exclude_class="sediment")
    assert evals[iou_type].params.iouType == iou_type
    ours = {k.removeprefix(f"{iou_type}_"): v for k, v in metrics.items() if k.startswith(iou_type)}
    reference = _direct(gt, results, iou_type)
    for name, value in zip(STATS, reference.stats, strict=True):
        assert ours[name] == pytest.approx(max(value, 0.0), abs=1e-12), name
    for category_id, name in ((1, "nucleus"), (2, "sediment")):
        direct = _direct(gt, results, iou_type, catIds=[category_id])
        assert ours[f"AP_class_{name}"] == pytest.approx(direct.stats[0], abs=1e-12)
    for iou in (0.5, 0.75, 0.85, 0.95):
        direct = _direct(gt, results, iou_type, iouThrs=np.array([iou]))
        assert ours[f"AP{round(iou * 100)}"] == pytest.approx(direct.stats[0], abs=1e-12)
    without = _direct(gt, results, iou_type, catIds=[1])
    for name, value in zip(STATS, without.stats, strict=True):
        assert ours[f"{name}_without_sediment"] == pytest.approx(max(value, 0.0), abs=1e-12), name
    # the case is not degenerate: the classes differ, and leaving one out changes the numbers
    assert 0.05 < ours["AP_class_sediment"] != ours["AP_class_nucleus"] < 0.95
    assert ours["AP_without_sediment"] != ours["AP"]


def test_unknown_excluded_class_lists_the_valid_ones(two_classes):
    gt, results = two_classes
    with pytest.raises(UserError, match="unknown class 'plankton'; valid: nucleus, sediment"):
        coco_report(gt, results, exclude_class="plankton")


def test_no_results_score_zero(two_classes):
    gt, _ = two_classes
    metrics, _ = coco_report(gt, [])
    assert (
        metrics["segm_AP"] == 0.0 and metrics["bbox_AR100"] == 0.0 and metrics["segm_AP_class_sediment"] == 0
    )


def test_max_dets_256_on_dense_images():
    """More than 100 objects per image: maxDets [1, 10, 256] reports AR256 (and AP at 256) under keys
    naming 256. pycocotools' own summarize hard-wires AP to maxDets=100 and gives -1 here; relabelling the
    last maxDets slot as 100 after accumulate makes that same summarize read the 256 slot."""
    gt, results = dense_case(images=1, grid=2)
    assert len(gt.anns) > 256 and len(results) > 256
    ev = run_cocoeval(gt, results, "segm", max_dets=256)
    ours = coco_summary(ev)
    reference = _direct(gt, results, "segm", maxDets=[1, 10, 256])
    assert reference.stats[0] == -1  # the pycocotools quirk this module works around
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR256", "ARs", "ARm", "ARl")
    for name, value in list(zip(names, reference.stats, strict=True))[1:]:
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    reference.params.maxDets = [1, 10, 100]
    with contextlib.redirect_stdout(io.StringIO()):
        reference.summarize()
    assert ours["AP"] == pytest.approx(reference.stats[0], abs=1e-12)
    assert ours["AR256"] > ours["AR100"] and ours["AP"] > 0.1


def test_format_table_puts_bbox_and_segm_side_by_side():
    table = format_table({"bbox_AP": 0.5, "segm_AP": 0.25, "segm_AP_class_x": 0.125, "kaggle_mAP": 0.75})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "bbox", "segm"]
    assert lines[1].split() == ["AP", "0.500", "0.250"]
    assert lines[2].split() == ["AP_class_x", "-", "0.125"]
    assert lines[3].split() == ["kaggle_mAP", "0.750"]


def test_benchmark_runs_on_a_small_case(capsys):
    out = benchmark_evaluators(images=1, grid=1, max_dets=100)
    printed = capsys.readouterr().out
    assert out["instances"] > 50 and out["pycocotools_s"] > 0
    assert "pycocotools:" in printed and "faster-coco-eval:" in printed
    assert out["largest_difference"] < 1e-9


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_accumulates_the_same_arrays_as_pycocotools(iou_type):
    """run_cocoeval uses faster-coco-eval: its precision, recall and scores arrays on dense images (hundreds
    of overlapping nuclei, perturbed, dropped and false detections) must be pycocotools' own."""
    gt, results = dense_case(images=2, grid=2)
    ours = run_cocoeval(gt, results, iou_type, max_dets=300)
    reference = _direct(gt, results, iou_type, maxDets=[1, 10, 100, 300])
    for key in ("precision", "recall", "scores"):
        np.testing.assert_allclose(ours.eval[key], reference.eval[key], rtol=0, atol=1e-12, err_msg=key)
