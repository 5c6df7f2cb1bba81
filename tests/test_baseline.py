"""The classical baseline (trainers/detection/baseline.py) on hand-made images whose objects are known, and
the per-image error analysis of trainers/evaluation.py on hand-made predictions whose TP/FP/FN and Kaggle
score are computed by hand; the search table's baseline row."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.instances import read_records
from datasets.records import rle_to_json
from tests.helpers import masks_ground_truth
from trainers.detection.baseline import MIN_AREA, baseline_metrics, baseline_results, label_objects
from trainers.evaluation import (
    image_outcomes,
    kaggle_metrics,
    per_image_ap,
    per_image_table,
    rows_csv,
    worst_rows,
)

SIZE = (96, 128)  # rows, columns
# Three discs: the first two touch (their centres 22 px apart, radius 12), the third stands alone.
DISCS = ((40, 30, 12), (40, 52, 12), (60, 100, 10))


def disc_labels() -> np.ndarray:
    """The discs' label image: 1..3, a pixel in two discs going to the nearer centre."""
    rows, cols = np.mgrid[: SIZE[0], : SIZE[1]]
    distances = np.stack([np.hypot(rows - r, cols - c) - radius for r, c, radius in DISCS])
    nearest = distances.argmin(axis=0)
    return np.where(distances.min(axis=0) <= 0, nearest + 1, 0)


def disc_image(bright_background: bool = False) -> np.ndarray:
    """The discs bright on a dark background (fluorescence) or dark on a bright one (bright-field), with a
    little noise and a 4-pixel speck that is not an object."""
    rng = np.random.default_rng(0)
    grey = np.where(disc_labels() > 0, 190.0, 35.0) + rng.normal(0, 6, SIZE)
    grey[5:7, 5:7] = 190.0  # a 4-pixel speck
    if bright_background:
        grey = 255.0 - grey
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _components(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == k for k in range(1, labels.max() + 1)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _best_ious(found: list[np.ndarray], truth: list[np.ndarray]) -> list[float]:
    return sorted(max(_iou(f, t) for f in found) for t in truth)


@pytest.mark.parametrize("bright_background", [False, True])
def test_otsu_finds_the_components_and_watershed_splits_the_touching_pair(bright_background):
    image = disc_image(bright_background)
    truth = _components(disc_labels())
    pair, alone = truth[0] | truth[1], truth[2]
    assert MIN_AREA > 4  # the speck is below the size of an object

    otsu = _components(label_objects(image, "otsu"))
    assert len(otsu) == 2  # the touching pair is one component; the speck is dropped
    assert _best_ious(otsu, [pair, alone])[0] > 0.9

    split = _components(label_objects(image, "otsu-watershed"))
    assert len(split) == 3
    assert _best_ious(split, truth)[0] > 0.85  # each disc found as its own object


def test_a_flat_image_has_no_objects():
    assert label_objects(np.full((32, 32, 3), 80, np.uint8), "otsu").max() == 0
    with pytest.raises(ValueError, match="otsu-watershed"):
        label_objects(disc_image(), "threshold")


def _mask_folders(root, images: dict[str, np.ndarray]):
    """A mask-folders dataset of `images` (name -> image), each with the discs as its objects."""
    for name, image in images.items():
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        Image.fromarray(image).save(root / name / "images" / f"{name}.png")
        for k, mask in enumerate(_components(disc_labels())):
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / name / "masks" / f"{k}.png")
    return read_records(root, "mask-folders")


def test_baseline_results_are_coco_results_that_score_as_expected(tmp_path):
    records = _mask_folders(tmp_path, {"a_dark": disc_image(), "b_bright": disc_image(True)})
    results = baseline_results(records, "otsu-watershed")
    assert sorted({r["image_id"] for r in results}) == [1, 2]  # record position + 1
    assert [len([r for r in results if r["image_id"] == i]) for i in (1, 2)] == [3, 3]
    for r in results:
        assert r["category_id"] == 1 and 0.0 < r["score"] <= 1.0
        assert r["segmentation"]["size"] == list(SIZE)
        x, y, w, h = r["bbox"]
        ys, xs = np.nonzero(mask_utils.decode(r["segmentation"]))
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)

    split = baseline_metrics(records, "otsu-watershed")
    merged = baseline_metrics(records, "otsu")
    assert split["kaggle_mAP"] > 0.6 and split["segm_AP50"] == pytest.approx(1.0)
    # The merged pair is one false positive and two missed objects at every IoU threshold.
    assert merged["kaggle_mAP"] < 0.5 * (1 + 1e-9) and merged["segm_AP"] < split["segm_AP"]
    assert baseline_metrics(records, "otsu") == merged  # cached: the same numbers, not recomputed


# ---- per-image error analysis ---------------------------------------------------------------------------


def _square(y: int, x: int, size: int = 10, shape=(40, 40)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y : y + size, x : x + size] = True
    return mask


def _rle(mask: np.ndarray) -> dict:
    return rle_to_json(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def _ground_truth(images: list[list[np.ndarray]]):
    """A pycocotools COCO of `images` (lists of masks), ids 1..N, file names img<N>.png."""
    return masks_ground_truth(images, 40, file_names=True)


def _result(image_id: int, mask: np.ndarray, score: float) -> dict:
    rle = _rle(mask)
    return {
        "image_id": image_id,
        "category_id": 1,
        "segmentation": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "score": score,
    }


@pytest.fixture
def hand_made():
    """Image 1: three squares; predicted exactly (IoU 1), shifted by 2 px (IoU 80/120 = 2/3), shifted by 6
    px (IoU 40/160 = 1/4: a false positive and a miss), one prediction on nothing, and one scoring below
    0.5 (left out). Image 2: one square, no prediction. Image 3: no object, one prediction. Image 4:
    nothing at all."""
    objects = [_square(2, 2), _square(2, 20), _square(25, 5)]
    gt = _ground_truth([objects, [_square(10, 10)], [], []])
    results = [
        _result(1, objects[0], 0.9),
        _result(1, _square(2, 22), 0.8),
        _result(1, _square(25, 11), 0.7),
        _result(1, _square(28, 28), 0.6),
        _result(1, _square(15, 15), 0.2),
        _result(3, _square(5, 5), 0.9),
    ]
    return gt, results


def test_per_image_table_matches_hand_counts(hand_made):
    gt, results = hand_made
    outcomes = image_outcomes(gt, results, score_threshold=0.5)
    rows = per_image_table(gt, results, outcomes)
    counts = [(r["image"], r["n_true"], r["n_pred"], r["TP"], r["FP"], r["FN"]) for r in rows]
    assert counts == [
        ("img1", 3, 4, 2, 2, 1),
        ("img2", 1, 0, 0, 0, 1),
        ("img3", 0, 1, 0, 1, 0),
        ("img4", 0, 0, 0, 0, 0),
    ]
    # Image 1: TP 2 at t = 0.50, 0.55, 0.60, 0.65 (2/3 > t), TP 1 above; TP / (4 + 3 - TP) at each.
    assert rows[0]["kaggle"] == pytest.approx((4 * 2 / 5 + 6 * 1 / 6) / 10, abs=1e-4)
    assert [r["kaggle"] for r in rows[1:]] == [0.0, 0.0, 1.0]  # nothing predicted, nothing there: 1
    assert rows[1]["segm_AP"] == 0.0 and rows[2]["segm_AP"] == rows[3]["segm_AP"] == ""  # "" = undefined
    assert outcomes[0].pairs and sorted(outcomes[0].false_positives) == [2, 3]
    assert outcomes[0].false_negatives == [2]
    # The table's Kaggle column is the per-image score kaggle_mAP averages.
    kaggle = kaggle_metrics(gt, results, 0.5)["kaggle_mAP"]
    assert np.mean([r["kaggle"] for r in rows]) == pytest.approx(kaggle, abs=1e-4)
    assert [r["image"] for r in worst_rows(rows, 2)] == ["img2", "img3"]  # score 0, then more errors first
    lines = rows_csv(rows).splitlines()
    assert lines[0] == "image_id,image,n_true,n_pred,segm_AP,kaggle,TP,FP,FN" and len(lines) == 5


def test_per_image_ap_is_cocoeval_on_that_image_alone(hand_made):
    """An image's AP equals the AP of a COCO evaluation whose ground truth holds that image only."""
    from trainers.evaluation import coco_report

    gt, results = hand_made
    ap = per_image_ap(gt, results)
    first = _ground_truth([[mask_utils.decode(a["segmentation"]).astype(bool) for a in gt.imgToAnns[1]]])
    alone = coco_report(first, [r for r in results if r["image_id"] == 1])[0]["segm_AP"]
    assert ap[1] == pytest.approx(alone, abs=1e-12) and 0.0 < ap[1] < 1.0
    assert ap[2] == 0.0 and ap[3] == -1.0  # missed; undefined without ground truth


def test_baseline_row_ranks_among_trials_and_is_no_trial():
    from trainers.search.report import baseline_row, format_table

    rows = [
        {"trial": "t1", "lr": 0.01, "segm_AP": 0.5, "status": "completed"},
        {"trial": "t2", "lr": 0.02, "segm_AP": 0.1, "status": "completed"},
    ]
    row = baseline_row(rows, "otsu", {"segm_AP": 0.3, "kaggle_mAP": 0.4})
    assert row == {"trial": "baseline (otsu)", "lr": None, "segm_AP": 0.3, "status": "baseline, not a model"}
    table = format_table([*rows, row], ["lr"], "segm_AP", "max").splitlines()
    assert [line.split()[0] for line in table[2:]] == ["t1", "baseline", "t2"]
    assert table[3].split()[:4] == ["baseline", "(otsu)", "-", "0.3"]
