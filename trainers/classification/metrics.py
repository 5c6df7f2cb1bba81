"""Metrics for slice and volume classification (micro-CT slice classifiers): a specimen's prediction
aggregates the probabilities of its slices, and every metric is computed at both levels.

    metrics, details = report(slice_probs, slice_labels, specimen_ids, ["benthic", "planktic"])
    print(format_report(metrics, ["benthic", "planktic"]))

The sums themselves come from scikit-learn; this module decides what is computed at which level, how
undefined values are reported (NaN, never an exception mid-run), and how keys are named for MLflow.
Decisions are argmax; given a model's operating point (trainers/classification/operating_point.py),
`report` also scores the decisions at that point under `<level>_op_<metric>` (AUC does not depend on it).
"""

import math
import re
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from trainers.classification.operating_point import OperatingPoint, balanced_accuracy, decide

AGGREGATIONS = ("mean", "vote")
SUMMARY_METRICS = ("acc", "bal_acc", "top3_acc", "precision", "recall", "f1", "auc")
PER_CLASS_METRICS = ("precision", "recall", "f1", "auc")
# the metrics of decisions, at argmax as above and at an operating point as op_<metric>
DECISION_METRICS = ("acc", "bal_acc", "precision", "recall", "f1")
OP_PER_CLASS_METRICS = ("recall", "f1")  # per class at the operating point, in the table

# What MLflow accepts in a metric key; anything else in a class name becomes "_".
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-/ ]")


def sanitise(name: str) -> str:
    """A class name made safe for an MLflow metric key ("G. ruber (pink)" -> "G. ruber _pink_")."""
    return _UNSAFE_KEY_CHARS.sub("_", str(name))


def _key_names(classes: Sequence[str]) -> list[str]:
    """Sanitised class names; two classes that sanitise to one key would overwrite each other's metrics."""
    names = [sanitise(c) for c in classes]
    if len(set(names)) != len(names):
        clashes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names collide once made safe for metric keys: {clashes} (from {classes})")
    return names


def _group_index(groups: Sequence) -> tuple[list, np.ndarray, np.ndarray]:
    """(group ids in order of first appearance, index of each element's group in that list, position of
    each group's first element)."""
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be one id per slice, got shape {groups.shape}")
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    # np.unique sorts the ids; renumber them by first appearance so the output follows the input order.
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return uniq[order].tolist(), rank[inverse.ravel()], first[order]


def _check_probs(probs: np.ndarray, n: int | None = None) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be N x C, got shape {probs.shape}")
    if n is not None and len(probs) != n:
        raise ValueError(f"probs has {len(probs)} rows for {n} slices/labels")
    return probs


def aggregate(probs: np.ndarray, groups: Sequence[str], method: str = "mean") -> tuple[list[str], np.ndarray]:
    """Volume probabilities from slice probabilities: (specimen ids in order of first appearance, S x C).

    method "mean": the mean of the specimen's slice probabilities.
    method "vote": the fraction of the specimen's slices whose argmax is each class. Classes with equal
    votes are separated by their mean probability: each row gets mean_prob * 1e-6 / n_slices added, then
    is renormalised to sum to 1. Vote fractions differ by at least 1 / n_slices, so the nudge never
    overturns a vote, only a tie, and argmax of the row is the voted class.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation method {method!r}; valid: {list(AGGREGATIONS)}")
    probs = _check_probs(probs, len(groups))
    ids, idx, _ = _group_index(groups)
    n_groups, n_classes = len(ids), probs.shape[1]
    counts = np.bincount(idx, minlength=n_groups).astype(np.float64)
    # One weighted bincount per class: much faster than np.add.at on ~100k rows, and C is small.
    sums = np.stack([np.bincount(idx, weights=probs[:, c], minlength=n_groups) for c in range(n_classes)], 1)
    mean = sums / counts[:, None]
    if method == "mean":
        return ids, mean
    votes = np.bincount(idx * n_classes + probs.argmax(1), minlength=n_groups * n_classes)
    fractions = votes.reshape(n_groups, n_classes) / counts[:, None]
    nudged = fractions + mean * (1e-6 / counts[:, None])
    return ids, nudged / nudged.sum(1, keepdims=True)


def confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C counts: rows = true class, columns = predicted class (argmax of probs)."""
    probs = _check_probs(probs, len(labels))
    return confusion_matrix(np.asarray(labels), probs.argmax(1), labels=list(range(num_classes)))


def _ovr_auc(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """One-vs-rest ROC AUC of class k; NaN when the labels hold only positives or only negatives."""
    positive = labels == k
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, probs[:, k]))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro precision/recall/F1/AUC (and top-3 accuracy beyond 3 classes),
    the same per class under `<metric>_<sanitised class name>`, and `n`. Prediction = argmax of probs
    (N x C); labels are class indices. Classes absent from labels and predictions count in the macro means
    with 0 (sklearn zero_division=0); AUC is averaged over the classes where it is defined, NaN if none."""
    probs = _check_probs(probs, len(labels))
    labels = _check_labels(labels, probs, classes)
    n_classes = len(classes)
    class_ids = list(range(n_classes))
    metrics = decision_metrics(probs.argmax(1), labels, classes)
    if n_classes > 3:
        metrics["top3_acc"] = float(top_k_accuracy_score(labels, probs, k=3, labels=class_ids))
    aucs = [_ovr_auc(probs, labels, k) for k in class_ids]
    if n_classes == 2:
        # The positive class's score; equal to the OvR AUC of class 1 (and of class 0 when rows sum to 1).
        metrics["auc"] = aucs[1]
    else:
        defined = [a for a in aucs if not math.isnan(a)]
        metrics["auc"] = float(np.mean(defined)) if defined else math.nan
    for k, name in enumerate(_key_names(classes)):
        metrics[f"auc_{name}"] = aucs[k]
    metrics["n"] = float(len(labels))
    return metrics


def _check_labels(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    n_classes = len(classes)
    if probs.shape[1] != n_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns for {n_classes} classes {list(classes)}")
    if len(labels) == 0:
        raise ValueError("no samples to compute metrics on")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"labels must be class indices in [0, {n_classes}), got {labels.min()}..{labels.max()}"
        )
    return labels


def decision_metrics(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy (sklearn's: mean recall over the classes present in `labels`), macro
    precision/recall/F1 and the same per class, of predicted class indices."""
    class_ids = list(range(len(classes)))
    metrics = {"acc": float(accuracy_score(labels, pred)), "bal_acc": balanced_accuracy(labels, pred)}
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, labels=class_ids, average=None, zero_division=0
    )
    # The plain mean of the per-class values is sklearn's average="macro" over labels=range(C).
    metrics.update(precision=float(precision.mean()), recall=float(recall.mean()), f1=float(f1.mean()))
    for k, name in enumerate(_key_names(classes)):
        metrics[f"precision_{name}"] = float(precision[k])
        metrics[f"recall_{name}"] = float(recall[k])
        metrics[f"f1_{name}"] = float(f1[k])
    return metrics


def report(
    slice_probs: np.ndarray,
    slice_labels: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    method: str = "mean",
    point: OperatingPoint | None = None,
) -> tuple[dict[str, float], dict]:
    """Slice-level metrics (keys `slice_*`) and volume-level metrics (`volume_*`, each specimen's probs
    from `aggregate(..., method)`, its label that of its slices), and the arrays the plots need:
    {"slice": {probs, labels, confusion}, "volume": {ids, probs, labels, confusion}}.

    With an operating `point`, also the decision metrics at that point (`slice_op_*`, `volume_op_*`). It
    was chosen on volumes; slices get the same rule (for mean aggregation, on the same scale)."""
    slice_probs = _check_probs(slice_probs, len(slice_labels))
    slice_labels = np.asarray(slice_labels).astype(np.int64)
    if len(groups) != len(slice_labels):
        raise ValueError(f"{len(groups)} specimen ids for {len(slice_labels)} slices")
    ids, idx, first_slice = _group_index(groups)
    volume_labels = slice_labels[first_slice]
    disagree = np.flatnonzero(slice_labels != volume_labels[idx])
    if len(disagree):
        g = idx[disagree[0]]
        found = sorted(set(slice_labels[idx == g].tolist()))
        raise ValueError(
            f"specimen {ids[g]!r} has slices labelled with different classes "
            f"{[classes[k] if 0 <= k < len(classes) else k for k in found]}"
        )
    volume_ids, volume_probs = aggregate(slice_probs, groups, method)
    n_classes = len(classes)
    metrics = {f"slice_{k}": v for k, v in classification_metrics(slice_probs, slice_labels, classes).items()}
    metrics.update(
        {f"volume_{k}": v for k, v in classification_metrics(volume_probs, volume_labels, classes).items()}
    )
    if point is not None:
        for level, probs, labels in (
            ("slice", slice_probs, slice_labels),
            ("volume", volume_probs, volume_labels),
        ):
            at_point = decision_metrics(decide(probs, point), labels, classes)
            metrics.update({f"{level}_op_{k}": v for k, v in at_point.items()})
    details = {
        "slice": {
            "probs": slice_probs,
            "labels": slice_labels,
            "confusion": confusion(slice_probs, slice_labels, n_classes),
        },
        "volume": {
            "ids": volume_ids,
            "probs": volume_probs,
            "labels": volume_labels,
            "confusion": confusion(volume_probs, volume_labels, n_classes),
        },
    }
    return metrics, details


def operating_point_numbers(point: OperatingPoint | None) -> dict[str, float]:
    """The numbers of an operating point under MLflow-safe keys: op_threshold (two classes) or
    op_weight_<class>; nothing for argmax."""
    if point is None:
        return {}
    if point.positive:
        return {"op_threshold": float(point.threshold)}
    return {
        f"op_weight_{name}": float(w)
        for name, w in zip(_key_names(point.classes), point.weights, strict=True)
    }


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others, widths fitted to the contents."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_report(metrics: dict, classes: Sequence[str]) -> str:
    """Plain-text tables of a `report`'s metrics: summary metrics by level (then the decision metrics at the
    operating point, `op_*` rows, when the report has them), then per class (volume level, then slice
    level). Missing metrics (top3_acc up to 3 classes, a level not computed) show as "-"."""
    levels = ("slice", "volume")
    names = [*SUMMARY_METRICS, *(f"op_{m}" for m in DECISION_METRICS)]
    summary = [
        [name, *(_cell(metrics.get(f"{level}_{name}")) for level in levels)]
        for name in names
        if any(f"{level}_{name}" in metrics for level in levels)
    ]
    counts = ["n", *(str(int(metrics[f"{lv}_n"])) if f"{lv}_n" in metrics else "-" for lv in levels)]
    columns = [("volume", m) for m in PER_CLASS_METRICS]
    if "volume_op_acc" in metrics:
        columns += [("volume", f"op_{m}") for m in OP_PER_CLASS_METRICS]
    columns += [("slice", m) for m in PER_CLASS_METRICS]
    per_class = [
        [str(cls), *(_cell(metrics.get(f"{level}_{m}_{key}")) for level, m in columns)]
        for cls, key in zip(classes, _key_names(classes), strict=True)
    ]
    short = {"precision": "prec", "recall": "rec", "f1": "f1", "auc": "auc"}
    class_header = [
        "class",
        *(
            f"{lv[:3]} {'op ' if m.startswith('op_') else ''}{short[m.removeprefix('op_')]}"
            for lv, m in columns
        ),
    ]
    return (
        _table(["metric", *levels], [*summary, counts])
        + "\n\nper class (vol = volume level, sli = slice level; op = at the operating point)\n"
        + _table(class_header, per_class)
    )
