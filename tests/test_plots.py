"""trainers/plots.py: each figure has the expected axes and curves and renders to a non-empty PNG."""

import io

import mlflow
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from pycocotools.coco import COCO
from skimage.segmentation import find_boundaries

from datasets.instances import InstanceDataset, coco_ground_truth, encode_masks, read_records
from tests.helpers import SAMPLE
from trainers.evaluation import PR_IOUS, run_cocoeval
from trainers.plots import (
    learning_curves,
    log_figure,
    loss_curves,
    outline_layer,
    pr_curves,
    prediction_overlays,
)


def _png(fig: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    image = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 5  # something is drawn, not a blank canvas
    return image


@pytest.fixture(scope="module")
def two_class_eval():
    """Two sample images, objects alternately of class 1 and 2, predictions = the objects (minus some)."""
    gt = coco_ground_truth(InstanceDataset(read_records(SAMPLE)[:2]))
    gt.dataset["categories"] = [{"id": 1, "name": "benthic"}, {"id": 2, "name": "planktic"}]
    for ann in gt.dataset["annotations"]:
        ann["category_id"] = 1 + ann["id"] % 2
    gt.createIndex()
    rng = np.random.default_rng(0)
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "bbox": a["bbox"],
            "score": float(rng.random()),
        }
        for a in gt.dataset["annotations"]
        if rng.random() < 0.8
    ]
    return gt, results


def test_pr_curves_one_axes_for_all_and_one_per_class(two_class_eval):
    gt, results = two_class_eval
    ev = run_cocoeval(gt, results, "segm")
    fig = pr_curves(ev, {c["id"]: c["name"] for c in gt.dataset["categories"]})
    assert [ax.get_title() for ax in fig.axes] == ["all classes", "benthic", "planktic"]
    for ax in fig.axes:
        assert len(ax.get_lines()) == 1 + len(PR_IOUS)  # IoU .50:.95 and one per threshold
        assert len(ax.get_legend().get_texts()) == 1 + len(PR_IOUS)
        recall, precision = ax.get_lines()[1].get_data()  # IoU 0.5: predictions are exact masks
        assert len(recall) == 101 and np.nanmax(precision) == pytest.approx(1.0)
    _png(fig)


def test_loss_curves_losses_and_metrics_apart():
    history = {
        "train_loss": [(1, 2.0), (2, 1.5), (3, 1.1)],
        "train_loss_mask": [(2, 0.6), (1, 0.7), (3, 0.5)],  # steps out of order, as a store may return
        "segm_AP": [(1, 0.1), (2, 0.2), (3, 0.3)],
    }
    fig = loss_curves(history)
    losses, metrics = fig.axes
    assert [line.get_label() for line in losses.get_lines()] == ["train_loss", "train_loss_mask"]
    assert list(losses.get_lines()[1].get_xdata()) == [1, 2, 3]
    assert [line.get_label() for line in metrics.get_lines()] == ["segm_AP"]
    _png(fig)
    assert len(loss_curves({"train_loss": [(1, 1.0)]}).axes) == 1


def test_learning_curves_one_line_per_trial():
    curves = {"t1": ([1, 2, 3], [0.1, 0.2, 0.3], [2.0, 1.5, 1.2]), "t2": ([1], [0.05], None)}
    fig = learning_curves(curves, "segm_AP")
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == ["t1", "t2"]
    assert [line.get_label() for line in right.lines] == ["t1"]  # t2 reported no training loss
    np.testing.assert_array_equal(left.lines[0].get_ydata(), [0.1, 0.2, 0.3])
    assert "segm_AP" in left.get_title()


def test_prediction_overlays_draw_masks_boxes_and_labels():
    records = read_records(SAMPLE)[:3]
    dataset = InstanceDataset(records)
    images, predictions = [], []
    for index in range(len(records)):
        image, target = dataset[index]
        images.append((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        masks = target["masks"].numpy().astype(bool)[:5]
        scores = np.linspace(0.1, 0.9, len(masks))
        predictions.append(
            [
                {"category_id": 1, "segmentation": rle, "bbox": list(box), "score": float(score)}
                for rle, box, score in zip(
                    encode_masks(masks), target["boxes"][:5].tolist(), scores, strict=True
                )
            ]
        )
    fig = prediction_overlays(
        images, predictions, dataset.categories, score_threshold=0.5, titles=["a", "b", "c"]
    )
    assert len(fig.axes) == 3
    for ax, entries in zip(fig.axes, predictions, strict=True):
        shown = sum(e["score"] >= 0.5 for e in entries)
        assert shown > 0 and len(ax.patches) == shown
        assert sum(t.get_text().startswith("nucleus 0.") for t in ax.texts) == shown
        assert len(ax.get_images()) == 2  # the image and the mask overlay
    overlay = fig.axes[0].get_images()[1].get_array()
    assert overlay[..., 3].max() == pytest.approx(0.45)  # masks filled with alpha
    _png(fig)


def test_error_overlays_outline_tp_fp_fn_in_their_colours():
    """One image: a matched prediction (TP), a prediction on nothing (FP) and a missed object (FN); each
    outline is drawn in its colour on its own object's border only."""
    from trainers.evaluation import image_outcomes
    from trainers.plots import ERROR_COLOURS, error_overlays, outline_layer

    masks = np.zeros((3, 60, 60), dtype=bool)
    masks[0, 5:20, 5:20] = True  # object found
    masks[1, 35:50, 35:50] = True  # object missed
    masks[2, 5:20, 40:55] = True  # a prediction on nothing
    rles = encode_masks(masks)
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "file_name": "x.png", "height": 60, "width": 60}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": rles[k], "area": 225.0,
             "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for k in (0, 1)
        ],
        "categories": [{"id": 1, "name": "nucleus"}],
    }  # fmt: skip
    gt.createIndex()
    results = [{"image_id": 1, "category_id": 1, "segmentation": rles[k], "score": 0.9} for k in (0, 2)]
    [outcome] = image_outcomes(gt, results)
    assert (len(outcome.pairs), outcome.false_positives, outcome.false_negatives) == (1, [1], [1])

    layer = outline_layer((60, 60), [rles[0]], ERROR_COLOURS["TP"])
    drawn = layer[..., 3] > 0
    assert drawn.sum() == 4 * 14 and (drawn <= masks[0]).all()  # the inner outline of a 15 x 15 square
    assert drawn[5, 5:20].all() and drawn[19, 5:20].all() and not drawn[6:19, 6:19].any()
    assert layer[drawn].tolist() == [[*ERROR_COLOURS["TP"], 1.0]] * (4 * 14)

    image = np.full((60, 60, 3), 40, np.uint8)
    fig = error_overlays([image], [outcome], ["x"])
    [ax] = fig.axes
    assert ax.get_title() == "x\nTP 1, FP 1, FN 1"
    drawn = {kind: ax.get_images()[1 + k].get_array() for k, kind in enumerate(("TP", "FP", "FN"))}
    assert drawn["TP"][5, 10, 3] == 1 and drawn["FP"][5, 45, 3] == 1 and drawn["FN"][35, 40, 3] == 1
    assert drawn["TP"][5, 45, 3] == 0 and drawn["FP"][35, 40, 3] == 0  # each only on its own objects
    _png(fig)


def test_log_figure_stores_a_png_in_the_active_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("plots", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            log_figure(loss_curves({"train_loss": [(1, 1.0), (2, 0.5)]}), "plots/loss.png")
        client = mlflow.MlflowClient(uri)
        assert [f.path for f in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss.png"]
        path = client.download_artifacts(run.info.run_id, "plots/loss.png", str(tmp_path))
        assert Image.open(path).format == "PNG"
    finally:
        mlflow.set_tracking_uri(previous)


def test_outline_layer_equals_the_boundaries_of_decoded_masks():
    rng = np.random.default_rng(6)
    masks = np.zeros((6, 40, 50), dtype=bool)
    for mask in masks[:5]:  # touching and overlapping rectangles, the last one empty
        y, x = rng.integers(0, 35), rng.integers(0, 45)
        mask[y : y + rng.integers(2, 15), x : x + rng.integers(2, 15)] = True
    masks[4, -1, :] = masks[4, 0, :] = True  # along the image's borders
    labels = np.zeros((40, 50), dtype=np.int32)
    for k, mask in enumerate(masks, start=1):
        labels[mask] = k
    expected = find_boundaries(labels, mode="inner")
    layer = outline_layer((40, 50), encode_masks(masks), (0.1, 0.2, 0.3))
    np.testing.assert_array_equal(layer[..., 3] == 1.0, expected)
    assert expected.sum() > 50
