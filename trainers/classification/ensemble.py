"""Ensembles of slice classifiers: soft voting, majority voting, and the ForamDeepSlice PatchEnsemble.

PatchEnsemble (RECIPES.md section 2): a primary model answers, except where a second model is confident
about one of the classes the primary is weakest on: for a slice whose secondary prediction c is a patched
class and whose secondary probability of c is at least `threshold`, the secondary's probabilities replace
the primary's. The patched classes (the k lowest validation F1 of the primary) and the threshold are chosen
on validation predictions only (`fit_patch`) and saved with the ensemble.

An ensemble folder holds ensemble.json and one checkpoint folder per member (member0/, member1/, ...); it
loads with `load_predictor` like a single checkpoint, predicts like one, and is logged and registered in
MLflow the same way (deploy/registry.py). Its decisions follow its own operating point (`operating_point`
in ensemble.json, chosen on the ensemble's validation probabilities), argmax without one: the members'
operating points were chosen for their own probabilities, not for the combined ones.
"""

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datasets.errors import UserError
from datasets.records import folder_written_atomically
from trainers.checkpoints import member_folder
from trainers.classification.metrics import aggregate, classification_metrics, sanitise
from trainers.classification.model import SliceClassifier, load_classifier_checkpoint
from trainers.classification.operating_point import (
    OperatingPoint,
    check_operating_point,
    coordinate_weights,
    decide,
)

METHODS = ("soft", "vote", "patch")
THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))  # candidate switching confidences


@dataclass
class Ensemble:
    method: str  # soft | vote | patch
    members: list[SliceClassifier]  # patch: [primary, secondary]
    patch_classes: list[str] = field(default_factory=list)  # patch only
    threshold: float = 1.0  # patch only: secondary confidence at or above which it takes over
    class_weights: list[float] = field(default_factory=list)  # the combined probabilities are multiplied
    # by these and renormalised (an operating point chosen on validation, `fit_class_weights`); [] = none
    operating_point: OperatingPoint | None = None  # the decision on the combined probabilities; None: argmax

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"method: unknown ensemble method '{self.method}'; valid: {', '.join(METHODS)}")
        if not self.members:
            raise UserError("ensemble: no member models")
        first = self.members[0]
        for m in self.members[1:]:
            if m.classes != first.classes:
                raise UserError(
                    f"ensemble: members predict different classes ({first.classes} vs {m.classes})"
                )
            if m.slicing != first.slicing:
                raise UserError(
                    "ensemble: members were trained on slices cut differently "
                    f"({first.slicing} vs {m.slicing}); they would see different slices of a volume"
                )
        if self.class_weights and len(self.class_weights) != len(first.classes):
            raise UserError(f"class_weights: expected {len(first.classes)} weights, got {self.class_weights}")
        if self.method == "patch" and len(self.members) != 2:
            raise UserError(
                f"patch ensemble: expected a primary and a secondary model, got {len(self.members)}"
            )

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    @property
    def slicing(self) -> dict:
        return self.members[0].slicing

    @property
    def aggregate(self) -> str:
        return self.members[0].aggregate

    def predict_proba(self, images) -> np.ndarray:
        return combine(self, [m.predict_proba(images) for m in self.members])

    def predict(self, images) -> np.ndarray:
        """The class index of every slice: the decision at the ensemble's operating point."""
        return decide(self.predict_proba(images), self.operating_point)


def combine(ensemble: Ensemble, member_probs: list[np.ndarray]) -> np.ndarray:
    """The ensemble's N x C probabilities from its members' (same order as `ensemble.members`)."""
    return reweight(_combine(ensemble, np.stack(member_probs)), ensemble.class_weights)


def reweight(probs: np.ndarray, weights: list[float]) -> np.ndarray:
    if not weights:
        return probs
    weighted = probs * np.asarray(weights)
    return weighted / weighted.sum(axis=1, keepdims=True)


def _combine(ensemble: "Ensemble", stack: np.ndarray) -> np.ndarray:
    if ensemble.method == "soft":
        return stack.mean(axis=0)
    if ensemble.method == "vote":
        # vote fractions; the members' mean probability breaks ties (it adds less than one vote's worth)
        votes = np.zeros_like(stack[0])
        for probs in stack:
            votes[np.arange(len(probs)), probs.argmax(axis=1)] += 1
        scores = votes + stack.mean(axis=0) * 1e-3
        return scores / scores.sum(axis=1, keepdims=True)
    return patch(
        stack[0], stack[1], [ensemble.classes.index(c) for c in ensemble.patch_classes], ensemble.threshold
    )


WEIGHTS = tuple(np.round(np.arange(1.0, 4.01, 0.25), 2))  # candidate class weights (1 = unchanged)


def fit_class_weights(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], groups: list[str], method: str, objective: str
) -> tuple[list[float], float]:
    """Per-class probability weights (coordinate ascent over WEIGHTS, two sweeps) maximising `objective`
    (acc or f1) of the volume-level predictions on validation specimens: the operating point of a model
    whose probabilities are skewed (class imbalance, label smoothing). Weights only move decisions; the
    ranking of volumes by one class's probability, hence binary AUC, is unchanged."""
    first: dict[str, int] = {}
    for g, y in zip(groups, labels, strict=True):
        first.setdefault(g, int(y))

    def score(weights: list[float]) -> float:
        ids, volume = aggregate(reweight(probs, weights), groups, method)
        return classification_metrics(volume, np.array([first[i] for i in ids]), classes)[objective]

    return coordinate_weights(score, len(classes), WEIGHTS)


def patch(primary: np.ndarray, secondary: np.ndarray, classes: list[int], threshold: float) -> np.ndarray:
    switch = np.isin(secondary.argmax(axis=1), classes) & (secondary.max(axis=1) >= threshold)
    return np.where(switch[:, None], secondary, primary)


def fit_patch(
    primary: np.ndarray,
    secondary: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    groups: list[str] | None = None,
    method: str = "mean",
) -> tuple[list[str], float, float]:
    """(patched classes, threshold, validation macro F1) maximising macro F1 on validation predictions:
    at volume level when `groups` (specimen of each slice) is given, else at slice level. Candidates: the
    k = 1 .. C-1 classes with the lowest primary F1, each threshold in THRESHOLDS; no patch when nothing
    beats the primary alone."""

    def score(probs: np.ndarray) -> float:
        if groups is None:
            return classification_metrics(probs, labels, classes)["f1"]
        ids, volume = aggregate(probs, groups, method)
        first = {}
        for g, y in zip(groups, labels, strict=True):
            first.setdefault(g, y)
        return classification_metrics(volume, np.array([first[i] for i in ids]), classes)["f1"]

    base = classification_metrics(primary, labels, classes)
    weakest = sorted(range(len(classes)), key=lambda c: base[f"f1_{sanitise(classes[c])}"])
    best = ([], 1.0, score(primary))
    for k in range(1, len(classes)):
        chosen = weakest[:k]
        for threshold in THRESHOLDS:
            value = score(patch(primary, secondary, chosen, float(threshold)))
            if value > best[2] + 1e-9:
                best = ([classes[c] for c in chosen], float(threshold), value)
    return best


def save_ensemble(folder: Path, ensemble: Ensemble, member_dirs: list[Path]) -> Path:
    """ensemble.json + a copy of each member checkpoint, written beside `folder` and renamed into place."""
    folder = Path(folder).resolve()
    if folder.exists():
        raise UserError(f"{folder}: already exists (choose a new ensemble folder)")
    with folder_written_atomically(folder) as tmp:
        tmp.mkdir()
        names = []
        for i, src in enumerate(member_dirs):
            name = f"member{i}"
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("train_state.pt"))
            names.append(name)
        spec = {
            "method": ensemble.method,
            "members": names,
            "patch_classes": ensemble.patch_classes,
            "threshold": ensemble.threshold,
            "class_weights": ensemble.class_weights,
            "classes": ensemble.classes,
            "operating_point": asdict(ensemble.operating_point) if ensemble.operating_point else None,
        }
        (tmp / "ensemble.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def is_classifier_folder(path: Path) -> bool:
    """A classifier checkpoint (classes.json) or an ensemble folder (ensemble.json)."""
    return (path / "classes.json").is_file() or (path / "ensemble.json").is_file()


def load_predictor(folder: Path, device: str = "cpu") -> SliceClassifier | Ensemble:
    """A classifier checkpoint folder or an ensemble folder, ready to predict."""
    folder = Path(folder)
    spec_file = folder / "ensemble.json"
    if not spec_file.is_file():
        return load_classifier_checkpoint(folder, device)
    try:
        spec = json.loads(spec_file.read_text())
        folders = [member_folder(folder, name, spec_file) for name in spec["members"]]
        members = [load_classifier_checkpoint(f, device) for f in folders]
        point = spec.get("operating_point")  # absent in ensembles from before operating points: argmax
        ensemble = Ensemble(
            spec["method"],
            members,
            list(spec.get("patch_classes", [])),
            float(spec["threshold"]),
            [float(w) for w in spec.get("class_weights", [])],
            OperatingPoint(**point) if point else None,
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{spec_file}: not a valid ensemble description ({e})") from None
    if ensemble.operating_point is not None:
        check_operating_point(ensemble.operating_point, ensemble.classes, f"{spec_file}: operating_point")
    return ensemble
