"""The one rule for the registry's `champion` alias, which every registering CLI (platform.train,
platform.tune, platform.ensemble) goes through: the alias moves only to a model that beats the current
champion on the same validation data, or when the user says so (--force-champion).

Every version registered here carries tags `val_data` (a fingerprint of the validation items it was measured
on), `metric` and `val_<metric>`. A candidate is compared with the champion's tag when the fingerprints
agree; otherwise the champion is evaluated on the candidate's validation data first. That can take minutes,
so the alias is read again just before it is set (MLflow has no compare-and-set): a champion that arrived
meanwhile is compared with too, and two searches finishing together cannot leave the worse one champion."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from datasets.errors import UserError
from datasets.instances import InstanceDataset, coco_ground_truth
from datasets.slices import split_rows
from datasets.volumes import VolumeRecord
from deploy.registry import load_classifier, load_detector, log_checkpoint, own_mode, registry_version
from trainers.classification.metrics import report
from trainers.classification.model import predict_volumes
from trainers.classification.train import slice_sets
from trainers.config import ClassifierConfig
from trainers.detection.inference import predict_records
from trainers.detection.train import config_split
from trainers.evaluation import score_results

ALIAS = "champion"


@dataclass
class Registration:
    version: ModelVersion
    promoted: bool  # the alias now points at `version`
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_value: float | None  # that champion's metric on the same validation data
    how: str  # how the champion's value was obtained, for the CLI's message
    forced: bool = False  # promoted by --force-champion although it does not beat the champion

    def message(self, metric: str, value: float) -> str:
        v = self.version
        if self.champion_version is None:
            return f"registered model: name={v.name} version={v.version} alias={ALIAS} (first champion)"
        against = f"champion version {self.champion_version}: {metric}={self.champion_value:.4f} ({self.how})"
        head = f"registered model: name={v.name} version={v.version}"
        if self.forced:
            return f"{head} alias={ALIAS} (--force-champion: {metric}={value:.4f} does not beat {against})"
        if self.promoted:
            return f"{head} alias={ALIAS} ({metric}={value:.4f} beats {against})"
        return (
            f"{head} without alias {ALIAS}: {metric}={value:.4f} does not beat {against}; "
            f"models:/{v.name}@{ALIAS} is unchanged"
        )


@dataclass(frozen=True)
class Validation:
    """The data a candidate was measured on: a fingerprint of its items, and how to measure another
    (registered) model on the same items: model URI -> metrics."""

    fingerprint: str
    evaluate: Callable[[str], dict[str, float]]


def fingerprint(items: list) -> str:
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()[:16]


def validation_fingerprint(cfg) -> str:
    """A hash of the validation items `cfg` evaluates on: image names and instance counts (detectors), or
    specimen, slice and label of every validation slice (classifiers)."""
    if isinstance(cfg, ClassifierConfig):
        _, val, _ = split_rows(Path(cfg.data), cfg.val_fraction, cfg.split_seed)
        return fingerprint([(r["specimen"], Path(r["path"]).name, r["label"]) for r in val])
    _, val = config_split(cfg)
    return fingerprint([(r.image_id, len(r.mask_paths) + len(r.instances)) for r in val])


def evaluate_model(model_uri: str, cfg) -> dict[str, float]:
    """The validation metrics of a registered model on `cfg`'s validation data, as a trial reports them."""
    if isinstance(cfg, ClassifierConfig):
        predictor = load_classifier(model_uri)
        _, val, _ = slice_sets(cfg)
        probs = predictor.predict_proba(val.images())
        metrics, _ = report(probs, val.labels, val.specimens, val.classes, cfg.aggregate)
        return metrics
    detector = load_detector(model_uri)
    _, val = config_split(cfg)
    results = predict_records(detector.model, val, detector.device, **own_mode(detector))
    max_dets = detector.config.box_detections_per_img
    return score_results(
        coco_ground_truth(InstanceDataset(val)), results, max_dets, detector.config.score_threshold
    )


def config_validation(cfg) -> Validation:
    """The validation split of a training config: what its run, or a search's trial, reported on."""
    return Validation(validation_fingerprint(cfg), partial(evaluate_model, cfg=cfg))


def volume_validation(records: list[VolumeRecord]) -> Validation:
    """Labelled volumes, each sliced as the model measured on them was trained (platform.ensemble --data)."""

    def evaluate(model_uri: str) -> dict[str, float]:
        predictor = load_classifier(model_uri)
        probs, groups, labels = predict_volumes(predictor, records)
        return report(probs, labels, groups, predictor.classes, predictor.aggregate)[0]

    return Validation(fingerprint([("volume", r.specimen, r.path.name, r.label) for r in records]), evaluate)


def current_champion(name: str) -> ModelVersion | None:
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None  # no such model yet, or no alias


def register_candidate(
    model: str | Path,
    name: str,
    cfg,
    metric: str,
    mode: str,
    value: float,
    baseline: tuple[str, float] | None = None,
    force: bool = False,
) -> Registration:
    """Register `model` as a new version of `name` and point `champion` at it only if
    `value` (its `metric`, maximised or minimised as `mode` says, on `cfg`'s validation data) beats the
    champion's on the same data, or with `force` (the champion is still measured, for the message).

    `model`: a logged model's URI (a str), or a checkpoint folder (a Path), logged first in the active run.
    `cfg`: a training config (its validation split), or a `Validation`.
    `baseline` = (model URI, value) of a model already measured on exactly this data (a thresholds search
    scores the model it searched with that model's own thresholds): used when that model is the champion.
    """
    validation = cfg if isinstance(cfg, Validation) else config_validation(cfg)
    model_uri = log_checkpoint(model).model_uri if isinstance(model, Path) else model
    version = mlflow.register_model(model_uri, name)
    client = mlflow.MlflowClient()
    tags = {"val_data": validation.fingerprint, "metric": metric, f"val_{metric}": repr(float(value))}
    for key, tag in tags.items():
        client.set_model_version_tag(name, version.version, key, tag)
    measured: dict[str, tuple[float, str]] = {}  # champion version -> (its value, how): measured once each
    current = current_champion(name)
    while True:
        if current is None:
            client.set_registered_model_alias(name, ALIAS, version.version)
            return Registration(version, True, None, None, "")
        theirs = str(current.version)
        if theirs not in measured:
            measured[theirs] = champion_value(current, validation, metric, baseline)
        their_value, how = measured[theirs]
        beats = value > their_value if mode == "max" else value < their_value
        if not (beats or force):
            return Registration(version, False, theirs, their_value, how)
        now = current_champion(name)  # compare-and-set: another registration may have moved it meanwhile
        if now is not None and str(now.version) == theirs:
            client.set_registered_model_alias(name, ALIAS, version.version)
            return Registration(version, True, theirs, their_value, how, forced=not beats)
        current = now


def champion_value(
    champion: ModelVersion, validation: Validation, metric: str, baseline: tuple[str, float] | None
) -> tuple[float, str]:
    """The champion's `metric` on the candidate's validation data, and how it was obtained."""
    if baseline is not None and registry_version(baseline[0]) == (champion.name, str(champion.version)):
        return baseline[1], "the searched model's own settings, same cached predictions"
    if champion.tags.get("val_data") == validation.fingerprint and f"val_{metric}" in champion.tags:
        return float(champion.tags[f"val_{metric}"]), "as registered, same validation data"
    metrics = validation.evaluate(f"models:/{champion.name}/{champion.version}")
    if metric not in metrics:
        raise UserError(f"--metric {metric}: the champion's evaluation has no such metric")
    return float(metrics[metric]), "re-evaluated on this validation data"
