"""trainers/classification/metrics.py and the classification plots: metrics against hand-computed cases and
brute-force references (not sklearn checked against itself), slice-to-volume aggregation, figure contents."""

import io
import itertools
import math
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from trainers.classification.metrics import (
    aggregate,
    classification_metrics,
    confusion,
    format_report,
    report,
    sanitise,
)
from trainers.plots import classification_figures, confusion_matrix_figure, f1_bars_figure, roc_figure

# MLflow's rule for metric keys (mlflow.utils.validation): alphanumerics, underscores, dashes, periods,
# spaces, slashes.
MLFLOW_KEY = re.compile(r"^[/\w.\- ]*$")


def _one_hot_probs(pred: list[int], num_classes: int) -> np.ndarray:
    """Probabilities whose argmax is `pred`: 0.6 on the predicted class, the rest shared."""
    probs = np.full((len(pred), num_classes), 0.4 / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = 0.6
    return probs


def _pair_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by definition: the fraction of (positive, negative) pairs where the positive scores higher,
    ties counting one half."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _random_probs(rng, n: int, c: int) -> np.ndarray:
    logits = rng.normal(size=(n, c))
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


# labels / predictions worked by hand:
#   class 0: TP 1 (#0), FP 1 (#5), FN 1 (#1) -> P 1/2, R 1/2, F1 1/2
#   class 1: TP 2 (#2, #3), FP 1 (#1), FN 0  -> P 2/3, R 1,   F1 4/5
#   class 2: TP 1 (#4), FP 0, FN 1 (#5)      -> P 1,   R 1/2, F1 2/3
LABELS = np.array([0, 0, 1, 1, 2, 2])
PRED = [0, 1, 1, 1, 2, 0]


def test_accuracy_precision_recall_f1_by_hand():
    m = classification_metrics(_one_hot_probs(PRED, 3), LABELS, ["a", "b", "c"])
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert [m["precision_a"], m["precision_b"], m["precision_c"]] == pytest.approx([1 / 2, 2 / 3, 1])
    assert [m["recall_a"], m["recall_b"], m["recall_c"]] == pytest.approx([1 / 2, 1, 1 / 2])
    assert [m["f1_a"], m["f1_b"], m["f1_c"]] == pytest.approx([1 / 2, 4 / 5, 2 / 3])
    assert m["n"] == 6
    assert "top3_acc" not in m  # top-3 of 3 classes is always right


def test_absent_class_counts_as_zero_in_the_macro_means():
    m = classification_metrics(_one_hot_probs(PRED, 4), LABELS, ["a", "b", "c", "never"])
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 0) / 4)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2 + 0) / 4)
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 0) / 4)
    assert m["f1_never"] == 0.0
    assert math.isnan(m["auc_never"])  # no positives: undefined, and left out of the macro AUC
    defined = [m[f"auc_{c}"] for c in "abc"]
    assert m["auc"] == pytest.approx(np.mean(defined))


def test_confusion_matrix_by_hand():
    cm = confusion(_one_hot_probs(PRED, 4), LABELS, 4)
    expected = [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]  # rows true, columns predicted
    np.testing.assert_array_equal(cm, expected)


def test_binary_auc_matches_pair_counting():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    p1 = np.round(np.clip(0.3 * labels + rng.random(60) * 0.7, 0, 1), 1)  # rounded: ties happen
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(probs, labels, ["benthic", "planktic"])
    reference = _pair_auc(labels == 1, p1)
    assert m["auc"] == pytest.approx(reference)
    assert m["auc_planktic"] == pytest.approx(reference)
    assert m["auc_benthic"] == pytest.approx(_pair_auc(labels == 0, 1 - p1))
    assert m["auc_benthic"] == pytest.approx(reference)  # the same ranking, seen from the other class


def test_multiclass_auc_is_the_macro_mean_of_one_vs_rest_pair_counts():
    rng = np.random.default_rng(2)
    classes = ["a", "b", "c", "d", "e"]
    labels = rng.integers(0, 4, 80)  # class "e" never occurs: its AUC is undefined
    probs = _random_probs(rng, 80, 5)
    probs[np.arange(80), labels] += 0.3
    m = classification_metrics(probs, labels, classes)
    per_class = [_pair_auc(labels == k, probs[:, k]) for k in range(4)]
    assert [m[f"auc_{c}"] for c in classes[:4]] == pytest.approx(per_class)
    assert math.isnan(m["auc_e"])
    assert m["auc"] == pytest.approx(np.mean(per_class))


def test_auc_is_nan_when_no_class_has_both_positives_and_negatives():
    m = classification_metrics(_random_probs(np.random.default_rng(3), 5, 3), np.zeros(5, int), "abc")
    assert math.isnan(m["auc"])


def test_top3_accuracy_by_brute_force():
    rng = np.random.default_rng(4)
    probs = _random_probs(rng, 200, 7)
    labels = rng.integers(0, 7, 200)
    hits = [
        lab in sorted(range(7), key=lambda k: -row[k])[:3] for row, lab in zip(probs, labels, strict=True)
    ]
    m = classification_metrics(probs, labels, [f"c{k}" for k in range(7)])
    assert m["top3_acc"] == pytest.approx(np.mean(hits))
    assert m["acc"] == pytest.approx(np.mean(probs.argmax(1) == labels))


def test_per_class_keys_are_sanitised_for_mlflow():
    classes = ["G. ruber (pink)", "N. dutertrei/x-1", "a+b"]
    m = classification_metrics(_one_hot_probs([0, 1, 2], 3), np.array([0, 1, 2]), classes)
    assert {"f1_G. ruber _pink_", "f1_N. dutertrei/x-1", "auc_a_b", "precision_a_b"} <= set(m)
    assert all(MLFLOW_KEY.match(k) for k in m)
    assert sanitise("ümlaut:1") == "_mlaut_1"


def test_class_names_colliding_after_sanitising_are_an_error():
    with pytest.raises(ValueError, match="collide"):
        classification_metrics(_one_hot_probs([0, 1], 2), np.array([0, 1]), ["a+b", "a_b"])


def test_aggregate_mean_matches_a_python_loop():
    rng = np.random.default_rng(5)
    groups = [f"spec{k}" for k in rng.integers(0, 12, 300)]
    probs = _random_probs(rng, 300, 4)
    ids, volume = aggregate(probs, groups, "mean")
    expected_ids = list(dict.fromkeys(groups))  # order of first appearance
    assert ids == expected_ids
    for i, g in enumerate(expected_ids):
        rows = [probs[j] for j in range(300) if groups[j] == g]
        np.testing.assert_allclose(volume[i], np.mean(rows, axis=0))


def test_aggregate_vote_breaks_ties_by_mean_probability():
    slices = {
        # 2 votes each for classes 0 and 1; class 1 has the higher mean (0.6375 against 0.3625)
        "tie_to_1": [[0.6, 0.4, 0.0], [0.55, 0.45, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0]],
        # the same tie, the other way round: class 0 has the higher mean
        "tie_to_0": [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.45, 0.55, 0.0]],
        # class 0 wins 2 votes to 1 although class 1 has the higher mean (0.66): the vote stands
        "vote_2_1": [[0.51, 0.49, 0.0], [0.51, 0.49, 0.0], [0.0, 1.0, 0.0]],
    }
    groups = [g for g, rows in slices.items() for _ in rows]
    probs = np.array([row for rows in slices.values() for row in rows])
    ids, volume = aggregate(probs, groups, "vote")
    assert ids == ["tie_to_1", "tie_to_0", "vote_2_1"]
    assert volume.argmax(1).tolist() == [1, 0, 0]
    np.testing.assert_allclose(volume.sum(1), 1.0)
    np.testing.assert_allclose(volume, [[0.5, 0.5, 0], [0.5, 0.5, 0], [2 / 3, 1 / 3, 0]], atol=1e-5)


def test_aggregate_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="median"):
        aggregate(np.ones((2, 2)) / 2, ["a", "a"], "median")


def test_report_slice_and_volume_levels():
    groups = ["s1", "s1", "s2", "s2", "s2", "s3"]
    labels = np.array([0, 0, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    metrics, details = report(probs, labels, groups, ["benthic", "planktic"])
    assert metrics["slice_acc"] == pytest.approx(3 / 6)  # right: #0, #2, #3
    assert metrics["slice_n"] == 6 and metrics["volume_n"] == 3
    volume = details["volume"]
    assert volume["ids"] == ["s1", "s2", "s3"]
    assert volume["labels"].tolist() == [0, 1, 1]
    np.testing.assert_allclose(volume["probs"][:, 1], [0.4, 1.7 / 3, 0.4])  # means: s1, s3 wrong, s2 right
    assert metrics["volume_acc"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(volume["confusion"], [[1, 0], [1, 1]])
    np.testing.assert_array_equal(details["slice"]["confusion"], [[1, 1], [2, 2]])
    text = format_report(metrics, ["benthic", "planktic"])
    assert "0.500" in text and "0.667" in text and "benthic" in text and "planktic" in text
    assert re.search(r"^top3_acc", text, re.M) is None  # two classes: no top-3 row


def test_report_rejects_a_specimen_whose_slices_disagree():
    with pytest.raises(ValueError, match="'s2'"):
        report(_one_hot_probs([0, 0, 1, 0], 2), np.array([0, 0, 1, 0]), ["s1", "s1", "s2", "s2"], ["a", "b"])


def test_format_report_rows_and_columns():
    rng = np.random.default_rng(6)
    classes = ["a", "b", "c", "d"]
    labels = np.repeat(np.arange(4), 10)
    metrics, _ = report(_random_probs(rng, 40, 4), labels, [f"v{k // 5}" for k in range(40)], classes)
    lines = format_report(metrics, classes).splitlines()
    assert lines[0].split() == ["metric", "slice", "volume"]
    acc = next(line for line in lines if line.startswith("acc "))
    assert acc.split()[1:] == [f"{metrics['slice_acc']:.3f}", f"{metrics['volume_acc']:.3f}"]
    assert any(line.startswith("top3_acc") for line in lines)
    row_d = next(line for line in lines if line.startswith("d "))
    assert row_d.split()[1] == f"{metrics['volume_precision_d']:.3f}"
    assert len(row_d.split()) == 1 + 8  # 4 metrics x (volume, slice)


def test_confusion_matrix_figure_annotates_every_cell():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    fig = confusion_matrix_figure(cm, ["a", "b", "c"], "test")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for v in cm.ravel())
    shares = ax.images[0].get_array()
    np.testing.assert_allclose(shares[0], [5 / 6, 1 / 6, 0])
    np.testing.assert_allclose(shares[2], 0)  # a class with no samples: no division by zero


def test_roc_figure_one_line_per_class_plus_chance():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 50)
    probs = _random_probs(rng, 50, 3)
    ax = roc_figure(probs, labels, ["a", "b", "c"], "t").axes[0]
    curves = [line for line in ax.get_lines() if line.get_label() != "chance"]
    assert len(curves) == 3 and len(ax.get_lines()) == 4
    assert [c.get_label().split()[0] for c in curves] == ["a", "b", "c"]
    auc_a = float(curves[0].get_label().split()[-1])
    assert auc_a == pytest.approx(_pair_auc(labels == 0, probs[:, 0]), abs=5e-4)

    binary = roc_figure(probs[:, :2] / probs[:, :2].sum(1, keepdims=True), labels % 2, ["x", "y"]).axes[0]
    assert [line.get_label().split()[0] for line in binary.get_lines()] == ["y", "chance"]


def test_f1_bars_and_classification_figures():
    rng = np.random.default_rng(8)
    classes = ["G. ruber (pink)", "b", "c"]
    labels = np.repeat(np.arange(3), 8)
    metrics, details = report(_random_probs(rng, 24, 3), labels, [f"v{k // 4}" for k in range(24)], classes)
    ax = f1_bars_figure(metrics, classes, "f1").axes[0]
    assert len(ax.patches) == 2 * len(classes)
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == pytest.approx(metrics["slice_f1_G. ruber _pink_"])
    assert heights[3] == pytest.approx(metrics["volume_f1_G. ruber _pink_"])

    figures = classification_figures(details, metrics, classes)
    assert set(figures) == {
        "plots/confusion_slice.png",
        "plots/confusion_volume.png",
        "plots/roc_slice.png",
        "plots/roc_volume.png",
        "plots/f1_per_class.png",
    }
    assert all(isinstance(f, Figure) for f in figures.values())
    buffer = io.BytesIO()
    figures["plots/confusion_volume.png"].savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
