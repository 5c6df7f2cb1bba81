"""The operating point of a slice classifier: the rule that turns its volume probabilities into a class,
chosen on the validation specimens for the weights training hands over, and saved beside them.

Argmax is the right rule only when the probabilities are calibrated to the deployment's class balance; a
model trained on imbalanced classes with label smoothing ranks volumes well (AUC) but calls nearly every
one the majority class. The operating point keeps the probabilities and moves the decision:

- two classes: a cut-off on the probability of the `positive` class (the rarer one on validation, the
  finding a user looks for): positive iff p(positive) >= threshold. The cut-off maximises the balanced
  accuracy of the validation volumes; ties go to the higher macro F1, then to the cut-off nearest 0.5
  (the least departure from argmax). Balanced accuracy only changes where the cut-off crosses a volume's
  probability, so the midpoints between neighbouring probabilities are every distinct decision there is.
- more classes: per-class multiplicative weights, decision argmax(p * w), by coordinate ascent over a
  log-spaced grid (two sweeps, starting from all ones: argmax; a weight moves only on a strict gain).
  Exhaustive search is exponential in the classes; coordinate ascent is what the ensemble's
  class weights already used (trainers/classification/ensemble.py) and is enough for a handful of classes.

    point = fit_operating_point(volume_probs, volume_labels, classes)
    decide(probs, point)  # class index per row; argmax when point is None (a checkpoint without one)

A checkpoint folder holds it as operating_point.json (absent in older checkpoints: argmax, as before).
"""

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

from datasets.errors import UserError

OPERATING_POINT_FILE = "operating_point.json"
WEIGHT_GRID = tuple(float(w) for w in 2.0 ** np.arange(-3.0, 3.01, 0.25))  # 1/8 .. 8, includes 1
MAX_CUTOFFS = 2000  # more distinct validation probabilities than this: quantiles of them are the candidates


@dataclass(frozen=True)
class OperatingPoint:
    classes: list[str]  # the model's classes, in the order of its probability columns
    positive: str = ""  # two classes: the class whose probability is cut; "" with more classes
    threshold: float = 0.5  # two classes: `positive` iff its probability >= threshold (argmax: 0.5)
    weights: list[float] = field(default_factory=list)  # more classes: argmax of probs * weights
    balanced_accuracy: float | None = None  # on the validation volumes it was chosen on (optimistic there)
    f1: float | None = None  # macro F1 there (None: not chosen on data, e.g. set by hand)
    volumes: int = 0  # how many validation volumes it was chosen on


def decide(probs: np.ndarray, point: OperatingPoint | None) -> np.ndarray:
    """The class index of every row of N x C probabilities: the operating point's rule, argmax without."""
    probs = np.asarray(probs, dtype=np.float64)
    if point is None:
        return probs.argmax(axis=1)
    if point.positive:
        pos = point.classes.index(point.positive)
        return np.where(probs[:, pos] >= point.threshold, pos, 1 - pos)
    return (probs * np.asarray(point.weights)).argmax(axis=1)


def describe(point: OperatingPoint | None) -> dict:
    """The rule in words and numbers, for a serving response or a report line."""
    if point is None:
        return {"rule": "argmax"}
    if point.positive:
        return {"rule": "cut-off", "class": point.positive, "threshold": round(point.threshold, 6)}
    return {"rule": "class weights", "weights": dict(zip(point.classes, point.weights, strict=True))}


def explain(point: OperatingPoint | None) -> str:
    """The rule in one line, for a printed report."""
    if point is None:
        return "argmax (the model has no operating point)"
    where = f"chosen on {point.volumes} validation volumes"
    if point.positive:
        other = next(c for c in point.classes if c != point.positive)
        return f"{point.positive} if p({point.positive}) >= {point.threshold:.4f}, else {other} ({where})"
    weights = ", ".join(f"{c} x{w:g}" for c, w in zip(point.classes, point.weights, strict=True))
    return f"argmax of the probabilities times {weights} ({where})"


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's balanced accuracy: the mean recall over the classes present in `labels` (a predicted class
    absent from them is expected on small sets; sklearn's warning about it is not news)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(labels, pred))


def scores(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(balanced accuracy, macro F1 over all n_classes) of predicted class indices: what the search ranks."""
    macro_f1 = f1_score(labels, pred, labels=list(range(n_classes)), average="macro", zero_division=0)
    return balanced_accuracy(labels, pred), float(macro_f1)


def fit_operating_point(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> OperatingPoint | None:
    """The operating point of validation volumes (probabilities S x C, class index of each); None when the
    labels hold fewer than two classes (no balance to choose for: the model keeps argmax)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or probs.shape != (len(labels), len(classes)):
        raise ValueError(f"probs of shape {probs.shape} for {len(labels)} labels and {len(classes)} classes")
    if len(np.unique(labels)) < 2:
        return None
    if len(classes) == 2:
        return _fit_cutoff(probs, labels, list(classes))
    return _fit_weights(probs, labels, list(classes))


def cutoff_candidates(p: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring distinct values of 0, p and 1: one cut-off per distinct decision on
    p (the first: everything positive; the last: nothing). Beyond MAX_CUTOFFS values, quantiles of p."""
    values = np.unique(np.clip(p, 0.0, 1.0))
    if len(values) > MAX_CUTOFFS:
        values = np.unique(np.quantile(values, np.linspace(0.0, 1.0, MAX_CUTOFFS)))
    edges = np.unique(np.concatenate([[0.0], values, [1.0]]))
    return (edges[:-1] + edges[1:]) / 2


def _fit_cutoff(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> OperatingPoint:
    counts = np.bincount(labels, minlength=2)
    pos = 0 if counts[0] < counts[1] else 1  # the rarer class; equal counts: the second, as AUC's positive
    p = probs[:, pos]

    def key(t: float) -> tuple[float, float, float]:
        pred = np.where(p >= t, pos, 1 - pos)
        return (*scores(labels, pred, 2), -abs(t - 0.5))

    best = max(cutoff_candidates(p), key=key)
    balanced, macro_f1, _ = key(best)
    return OperatingPoint(classes, classes[pos], float(best), [], balanced, macro_f1, len(labels))


def coordinate_weights(
    score: Callable[[list[float]], float | tuple], n_classes: int, grid: Sequence[float], sweeps: int = 2
) -> tuple[list[float], float | tuple]:
    """Per-class weights maximising `score(weights)` by coordinate ascent: from all ones, each class in turn
    tries every value of `grid` and keeps one only on a strict gain; `sweeps` passes. (weights, score)."""
    weights = [1.0] * n_classes
    best = score(weights)
    for _ in range(sweeps):
        for c in range(n_classes):
            for w in grid:
                trial = [*weights[:c], float(w), *weights[c + 1 :]]
                value = score(trial)
                if _gain(value, best):
                    weights, best = trial, value
    return weights, best


def _gain(value, best, tol: float = 1e-9) -> bool:
    """value > best by more than tol, lexicographically for tuples (ties on the first go to the second)."""
    value = value if isinstance(value, tuple) else (value,)
    best = best if isinstance(best, tuple) else (best,)
    for v, b in zip(value, best, strict=True):
        if v > b + tol:
            return True
        if v < b - tol:
            return False
    return False


def _fit_weights(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> OperatingPoint:
    def score(weights: list[float]) -> tuple[float, float]:
        return scores(labels, (probs * np.asarray(weights)).argmax(axis=1), len(classes))

    weights, (balanced, macro_f1) = coordinate_weights(score, len(classes), WEIGHT_GRID)
    return OperatingPoint(classes, "", 0.5, weights, balanced, macro_f1, len(labels))


def save_operating_point(folder: Path, point: OperatingPoint | None) -> None:
    """operating_point.json in a checkpoint folder (nothing for None: the model decides by argmax)."""
    if point is not None:
        (Path(folder) / OPERATING_POINT_FILE).write_text(json.dumps(asdict(point), indent=2) + "\n")


def read_operating_point(folder: Path, classes: Sequence[str]) -> OperatingPoint | None:
    """The operating point saved in a checkpoint folder, checked against the model's classes; None when the
    folder has none (a checkpoint from before operating points: argmax)."""
    path = Path(folder) / OPERATING_POINT_FILE
    if not path.is_file():
        return None
    try:
        point = OperatingPoint(**json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise UserError(f"{path}: not a valid operating point ({e})") from None
    return check_operating_point(point, classes, str(path))


def check_operating_point(point: OperatingPoint, classes: Sequence[str], where: str) -> OperatingPoint:
    if list(point.classes) != list(classes):
        raise UserError(
            f"{where}: operating point for classes {point.classes}, the model has {list(classes)}"
        )
    if point.positive:
        if len(classes) != 2 or point.positive not in classes:
            raise UserError(f"{where}: a cut-off needs two classes and one of them as 'positive'")
        if not 0.0 <= point.threshold <= 1.0:
            raise UserError(f"{where}: threshold must be in [0, 1], got {point.threshold}")
    elif len(point.weights) != len(classes) or not all(w > 0 for w in point.weights):
        raise UserError(f"{where}: expected {len(classes)} positive class weights, got {point.weights}")
    return point
