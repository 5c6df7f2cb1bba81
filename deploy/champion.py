"""The registry's `champion` alias moves only to a model that beats the current champion on the same
validation data.

Every version registered here carries tags `val_data` (a fingerprint of the validation items it was measured
on), `metric` and `val_<metric>`. A candidate is compared with the champion's tag when the fingerprints
agree; otherwise the champion is evaluated on the candidate's validation data first."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from datasets.errors import UserError

ALIAS = "champion"


@dataclass
class Registration:
    version: ModelVersion
    promoted: bool  # the alias now points at `version`
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_value: float | None  # that champion's metric on the same validation data
    how: str  # how the champion's value was obtained, for the CLI's message

    def message(self, metric: str, value: float) -> str:
        v = self.version
        if self.champion_version is None:
            return f"registered model: name={v.name} version={v.version} alias={ALIAS} (first champion)"
        against = f"champion version {self.champion_version}: {metric}={self.champion_value:.4f} ({self.how})"
        if self.promoted:
            return (
                f"registered model: name={v.name} version={v.version} alias={ALIAS} "
                f"({metric}={value:.4f} beats {against})"
            )
        return (
            f"registered model: name={v.name} version={v.version} without alias {ALIAS}: "
            f"{metric}={value:.4f} does not beat {against}; models:/{v.name}@{ALIAS} is unchanged"
        )


def validation_fingerprint(cfg) -> str:
    """A hash of the validation items `cfg` evaluates on: image names and instance counts (detectors), or
    specimen, slice and label of every validation slice (classifiers)."""
    from trainers.config import ClassifierConfig

    if isinstance(cfg, ClassifierConfig):
        from datasets.slices import split_rows

        _, val, _ = split_rows(Path(cfg.data), cfg.val_fraction, cfg.split_seed)
        items = sorted((r["specimen"], Path(r["path"]).name, r["label"]) for r in val)
    else:
        from trainers.detection.train import config_split

        _, val = config_split(cfg)
        items = sorted((r.image_id, len(r.mask_paths) + len(r.instances)) for r in val)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def evaluate_model(model_uri: str, cfg) -> dict[str, float]:
    """The validation metrics of a registered model on `cfg`'s validation data, as a trial reports them."""
    import torch

    from trainers.config import ClassifierConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(cfg, ClassifierConfig):
        from deploy.registry import load_classifier
        from trainers.classification.metrics import report
        from trainers.classification.train import slice_sets

        predictor = load_classifier(model_uri, device)
        _, val, _ = slice_sets(cfg)
        probs = predictor.predict_proba(val.images())
        metrics, _ = report(probs, val.labels, val.specimens, val.classes, cfg.aggregate)
        return metrics
    from datasets.instances import InstanceDataset, coco_ground_truth
    from deploy.registry import load_detector
    from trainers.detection.inference import predict_records
    from trainers.detection.train import config_split, score_results

    detector = load_detector(model_uri)
    _, val = config_split(cfg)
    own = detector.config
    results = predict_records(
        detector.model,
        val,
        detector.device,
        tile_size=own.tile_size,
        tile_overlap=own.tile_overlap,
        cfg=own,
        categories=detector.categories,
    )
    return score_results(coco_ground_truth(InstanceDataset(val)), results, own.box_detections_per_img)


def model_folder(value: str) -> Path:
    """The local checkpoint folder of a detector or classifier given as a folder or an MLflow model URI."""
    path = Path(value).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if ":/" not in value:
        raise UserError(
            f"--model: {value} is not a checkpoint folder (config.json, model.pt) nor an MLflow model URI "
            "(models:/NAME@champion, runs:/RUN_ID/model)"
        )
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=value))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise UserError(f"--model: cannot load {value}: {str(e).splitlines()[0]}") from None
    for name in ("checkpoint", "classifier"):
        if (local / "artifacts" / name / "config.json").is_file():
            return local / "artifacts" / name
    raise UserError(f"--model: {value} holds no platform checkpoint (artifacts/checkpoint or classifier)")


def current_champion(name: str) -> ModelVersion | None:
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        return None  # no such model yet, or no alias


def register_candidate(
    checkpoint: Path,
    name: str,
    cfg,
    metric: str,
    mode: str,
    value: float,
    baseline: tuple[str, float] | None = None,
) -> Registration:
    """Log `checkpoint` in the active run, register it as a new version of `name`, and point `champion` at
    it only if `value` (its `metric` on `cfg`'s validation data) beats the champion's on the same data.

    `baseline` = (model URI, value) of a model already measured on exactly this data (a thresholds search
    scores the model it searched with that model's own thresholds): used when that model is the champion.
    """
    from deploy.registry import log_checkpoint, registry_version

    fingerprint = validation_fingerprint(cfg)
    info = log_checkpoint(checkpoint)
    version = mlflow.register_model(info.model_uri, name)
    client = mlflow.MlflowClient()
    for key, tag in (("val_data", fingerprint), ("metric", metric), (f"val_{metric}", repr(float(value)))):
        client.set_model_version_tag(name, version.version, key, tag)
    current = current_champion(name)
    if current is None:
        client.set_registered_model_alias(name, ALIAS, version.version)
        return Registration(version, True, None, None, "")
    if baseline is not None and registry_version(baseline[0]) == (name, str(current.version)):
        theirs, how = baseline[1], "the searched model's own settings, same cached predictions"
    elif current.tags.get("val_data") == fingerprint and f"val_{metric}" in current.tags:
        theirs, how = float(current.tags[f"val_{metric}"]), "as registered, same validation data"
    else:
        metrics = evaluate_model(f"models:/{name}/{current.version}", cfg)
        if metric not in metrics:
            raise UserError(f"--metric {metric}: the champion's evaluation has no such metric")
        theirs, how = float(metrics[metric]), "re-evaluated on this validation data"
    better = value > theirs if mode == "max" else value < theirs
    if better:
        client.set_registered_model_alias(name, ALIAS, version.version)
    return Registration(version, better, str(current.version), theirs, how)
