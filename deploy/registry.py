"""Model registry seam: log a trained Mask R-CNN, a detector ensemble, a slice classifier or a classifier
ensemble as an MLflow pyfunc model, turn any model reference (a folder, or an MLflow URI such as
`models:/NAME@champion`) into a local model folder (`resolve`, the one place that does), load it (a detector
with its config's test-time augmentation, trainers/detection/combine.py) and predict. Ray Serve deployments
and every CLI load through here; the `champion` alias moves only through deploy/champion.py."""

import json
import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models.model import ModelInfo
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from trainers.classification.ensemble import Ensemble, is_classifier_folder, load_predictor
from trainers.classification.model import SliceClassifier
from trainers.config import MaskRCNNConfig
from trainers.detection import inference
from trainers.detection.combine import is_ensemble_folder, load_detector_model
from trainers.detection.model import CHECKPOINT_FILES

REPO = Path(__file__).resolve().parents[1]
LOCAL_STORE = REPO / ".mlflow"  # embedded MLflow: SQLite file + artifact folder, git-ignored


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store inside the checkout."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    LOCAL_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


@dataclass
class Detector:
    """A loaded registered detector and where it came from."""

    model: torch.nn.Module
    categories: list[dict]
    config: MaskRCNNConfig  # what it was trained with (tile_size: tiled inference at native resolution)
    device: str
    uri: str
    name: str | None = None
    version: str | None = None


class PlatformPyfunc(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(uri).predict(inputs)` of a logged platform model: a detector (artifact
    `checkpoint`) takes [image, ...] and gives one dict of numpy arrays per image (predict_image's); a
    classifier or ensemble (artifact `classifier`) takes [slice, ...] and gives N x C class probabilities
    (`classes` of the unwrapped model names the columns). It loads through load_detector / load_classifier,
    as the platform does; loading needs this checkout importable (run from the repo root).
    """

    # predict takes a list of numpy images, which MLflow's type-hint schemas cannot describe; without
    # this, every import printed its advice to add type hints (its own filter overrides ours).
    _skip_type_hint_validation = True

    def load_context(self, context):
        if "checkpoint" in context.artifacts:
            self.model = load_detector(context.artifacts["checkpoint"])
        else:
            self.model = load_classifier(context.artifacts["classifier"])

    def predict(self, context, model_input, params=None):
        if isinstance(self.model, Detector):
            return [predict_image(self.model, image) for image in model_input]
        return self.model.predict_proba(model_input)


# The models are logged "from code": MLflow copies this file into the logged model and runs it when
# `mlflow.pyfunc.load_model` loads one, where a pickled `python_model` would be unpickled, and a pickle
# can run any code. So no logged model of ours holds a pickle; the weights load with weights_only=True.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def _log_pyfunc(artifact_name: str, kind: str, folder: Path) -> ModelInfo:
    # Explicit requirements: MLflow's inference would import-trace the model in a subprocess.
    return mlflow.pyfunc.log_model(
        name=artifact_name,
        python_model=str(PYFUNC_CODE),
        artifacts={kind: str(folder)},
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def log_detector(checkpoint_dir: Path, artifact_name: str = "model") -> ModelInfo:
    """Log a checkpoint folder or a detector ensemble folder as a pyfunc model in the active MLflow run."""
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "checkpoint"
        if is_ensemble_folder(checkpoint_dir):  # its members are slim already (combine.save_ensemble)
            shutil.copytree(checkpoint_dir, slim, ignore=shutil.ignore_patterns("train_state.pt", ".*"))
        else:
            slim.mkdir()
            for name in CHECKPOINT_FILES:
                shutil.copy2(checkpoint_dir / name, slim / name)
        return _log_pyfunc(artifact_name, "checkpoint", slim)


def log_classifier(folder: Path, artifact_name: str = "model") -> ModelInfo:
    """Log a classifier checkpoint folder or an ensemble folder (without optimizer state)."""
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "classifier"
        shutil.copytree(folder, slim, ignore=shutil.ignore_patterns("train_state.pt", ".*"))
        return _log_pyfunc(artifact_name, "classifier", slim)


def log_checkpoint(folder: Path, artifact_name: str = "model") -> ModelInfo:
    """Log whatever a training run checkpointed: a classifier (classes.json) or a detector."""
    folder = Path(folder)
    if is_classifier_folder(folder):
        return log_classifier(folder, artifact_name)
    return log_detector(folder, artifact_name)


def register(model_uri: str, name: str, alias: str = "champion") -> ModelVersion:
    """Register and point `alias` at the new version unconditionally: for fixtures in a fresh store (tests,
    benchmarks). The CLIs register through deploy.champion, whose rule decides where `champion` goes."""
    version = mlflow.register_model(model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def load_detector(value: str, device: str | None = None) -> Detector:
    """A Mask R-CNN or a detector ensemble given as a folder or a model URI (`models:/NAME@alias`,
    `models:/NAME/VERSION`, `runs:/...`, a local MLflow model folder), ready for `predict_image`, with its
    config's test-time augmentation (`tta`) applied: `detector.model` may be a combine.TTAModel or
    MaskVoteEnsemble, whose `roi_heads.detections_per_img` sets the cap of every model inside."""
    folder = resolve(value)
    if is_classifier_folder(folder):
        raise UserError(f"--model: {value} is a slice classifier, not a Mask R-CNN")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, config, categories = load_detector_model(folder, device)
    name, version = registry_version(str(value))
    return Detector(model, categories, config, device, str(value), name, version)


def set_tta(detector: Detector, mode: str) -> None:
    """Test-time augmentation `mode` in place of the detector's own (load_detector applied the config's)."""
    from trainers.detection.combine import with_tta

    detector.model = with_tta(detector.model, mode)


def registry_version(uri: str) -> tuple[str | None, str | None]:
    """(registered name, version) of a `models:/NAME@alias` or `models:/NAME/VERSION` URI, else Nones."""
    if not uri.startswith("models:/"):
        return None, None
    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        return name, str(mlflow.MlflowClient().get_model_version_by_alias(name, ref).version)
    name, _, version = name.partition("/")
    return name, version


def resolve_registered(uri: str) -> tuple[str, str]:
    """(name, version) that a `models:/NAME@alias` or `models:/NAME/VERSION` URI names in the registry;
    a UserError for anything else (a run, a folder) or a name, alias or version the registry lacks."""
    if not uri.startswith("models:/"):
        raise UserError(f"{uri}: not a registered model; expected models:/NAME@alias or models:/NAME/VERSION")
    try:
        name, version = registry_version(uri)
        mlflow.MlflowClient().get_model_version(name, version)
    except mlflow.exceptions.MlflowException as e:
        raise UserError(
            f"{uri}: not in the model registry at {mlflow.get_registry_uri()} ({str(e).splitlines()[0]})"
        ) from None
    return name, version


# The measures a model is shown with (the page's Models tab), after the one it was registered on: its
# validation numbers beside the classical baseline's, instead of every metric its run logged.
HEADLINE = ("segm_AP", "kaggle_mAP", "bbox_AP", "volume_auc", "volume_bal_acc", "volume_f1", "volume_acc")
HEADLINE_SHOWN = 3


def version_info(name: str, version: str) -> dict:
    """What the registry says about one model version: aliases, its metrics (the run's latest values and
    the registered validation metric, tags val_<metric>), when it was registered, and for people: its
    headline measures with the classical baseline's beside them (logged on the run, or on its search's
    parent run), the validation data they were measured on (the run's dataset input), and a link to the
    run when the tracking server has a web UI."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id) if mv.run_id else None
    metrics = dict(run.data.metrics) if run else {}
    for key, value in mv.tags.items():
        if key.startswith("val_") and key != "val_data":
            try:
                metrics[key] = float(value)
            except ValueError:
                pass
    parent_id = run.data.tags.get("mlflow.parentRunId") if run else None
    parent = client.get_run(parent_id) if parent_id else None
    return {
        "name": name,
        "version": str(version),
        "aliases": sorted(mv.aliases),
        "metric": mv.tags.get("metric"),
        "metrics": {k: metrics[k] for k in sorted(metrics)},
        "headline": headline(mv.tags.get("metric"), metrics, parent.data.metrics if parent else {}),
        "validation": validation_input(run, parent),
        "run_id": mv.run_id,
        "run_url": run_url(run),
        "registered_at_ms": mv.creation_timestamp,
    }


def headline(metric: str | None, metrics: dict, parent_metrics: dict) -> list[dict]:
    """[{name, value, baseline}] for the registered metric (its registered validation value, val_<metric>,
    when there is one) and the next HEADLINE measures the run has, HEADLINE_SHOWN in all; baseline is the
    run's or its parent's baseline_<name>, or None."""
    names = [metric] if metric else []
    names += [k for k in HEADLINE if k in metrics and k not in names]
    shown = []
    for key in names[:HEADLINE_SHOWN]:
        value = metrics.get(f"val_{key}", metrics.get(key))
        if value is None:
            continue
        baseline = metrics.get(f"baseline_{key}", parent_metrics.get(f"baseline_{key}"))
        shown.append({"name": key, "value": value, "baseline": baseline})
    return shown


def validation_input(run, parent) -> dict | None:
    """{name, digest, profile} of the validation dataset input of the run (or of its search's parent
    run, which logs what every trial validated on); None when neither logged one."""
    for source in (run, parent):
        for item in source.inputs.dataset_inputs if source and source.inputs else []:
            if any(t.key == "mlflow.data.context" and t.value == "validation" for t in item.tags):
                data = item.dataset
                try:
                    profile = json.loads(data.profile) if data.profile else {}
                except ValueError:
                    profile = {}
                return {"name": data.name, "digest": data.digest, "profile": profile}
    return None


def run_url(run) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is a web server; None for a local store (the
    page says how to open it with `mlflow ui`)."""
    uri = mlflow.get_tracking_uri()
    if run is None or not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


EXPECTED = (
    "a checkpoint folder (model.pt, config.json, categories.json), a detector ensemble folder "
    "(detector_ensemble.json), a classifier or ensemble folder (classes.json or ensemble.json), or an "
    "MLflow model URI (models:/NAME@alias, runs:/RUN_ID/model)"
)


def is_model_folder(folder: Path) -> bool:
    """A folder the platform loads as one model: a detector or classifier checkpoint, or an ensemble."""
    return (
        is_classifier_folder(folder)
        or is_ensemble_folder(folder)
        or all((folder / f).is_file() for f in CHECKPOINT_FILES)
    )


def resolve(value: str, flag: str = "--model") -> Path:
    """The local folder of a model reference: a detector checkpoint, detector ensemble, classifier
    checkpoint or classifier ensemble folder given directly, or an MLflow model (a URI, downloaded from the
    store, or a local MLflow model folder) holding one. Anything else is a UserError that starts with
    `flag` and names the value."""
    path = Path(value).expanduser()
    if ":/" in value:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=value))
        except (mlflow.exceptions.MlflowException, OSError) as e:
            raise UserError(f"{flag}: cannot load {value}: {str(e).splitlines()[0]}") from None
    elif not path.is_dir():
        what = "is a file" if path.exists() else "not found"
        raise UserError(f"{flag}: {value} {what}; expected {EXPECTED}")
    if ":/" in value or (path / "MLmodel").is_file():  # an MLflow model: ours is one of its artifacts
        for name in ("checkpoint", "classifier"):
            folder = path / "artifacts" / name
            if is_model_folder(folder):
                return folder.resolve()
        raise UserError(f"{flag}: {value} holds no platform model (artifacts/checkpoint or classifier)")
    if is_classifier_folder(path) or is_ensemble_folder(path):
        return path.resolve()
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise UserError(
                f"{flag}: {path / name} not found (a checkpoint folder holds model.pt, config.json and "
                "categories.json; a detector ensemble folder detector_ensemble.json, a classifier folder "
                "classes.json, a classifier ensemble folder ensemble.json)"
            )
    return path.resolve()


def classifier_folder(value: str, flag: str = "--model") -> Path:
    """`resolve`, for a slice classifier or an ensemble only."""
    folder = resolve(value, flag)
    if not is_classifier_folder(folder):
        raise UserError(f"{flag}: {value} is a Mask R-CNN, not a slice classifier or ensemble")
    return folder


def load_classifier(value: str, device: str | None = None) -> SliceClassifier | Ensemble:
    """A classifier or ensemble (folder, or registered/logged model URI), ready to `predict_proba`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_predictor(classifier_folder(value), device)


def reported(results: list[dict], cfg, score_threshold: float | None = None) -> list[dict]:
    """The detections of `results` a detector reports as objects: those scoring at least `score_threshold`,
    by default its operating point (cfg.score_threshold, chosen on validation in training)."""
    cut = cfg.score_threshold if score_threshold is None else score_threshold
    return [r for r in results if r["score"] >= cut]


def own_mode(detector) -> dict:
    """The inference settings a detector was trained for (trainers.detection.inference.predict_image's):
    whole images or tiles of its tile_size, and its own class_score_thresh / mask_min_area filters."""
    cfg = detector.config
    return {
        "tile_size": cfg.tile_size,
        "tile_overlap": cfg.tile_overlap,
        "cfg": cfg,
        "categories": detector.categories,
    }


def predict_image(
    detector, image: np.ndarray, score_threshold: float | None = None, mask_threshold: float | None = None
) -> dict:
    """HxWx3 uint8 (or HxW grey) -> {boxes Nx4 xyxy, labels N, scores N, masks NxHxW bool, class_names N},
    through the one inference path in the model's own mode (tiled when it was trained on tiles). The
    detector config's class_score_thresh and mask_min_area apply (trainers/detection/postprocess.py), then
    `score_threshold`, by default the model's operating point (its config's score_threshold)."""
    results = inference.predict_image(
        detector.model, image, detector.device, mask_threshold=mask_threshold, **own_mode(detector)
    )
    kept = reported(results, detector.config, score_threshold)
    names = {c["id"]: c["name"] for c in detector.categories}
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in kept)]
    masks = np.zeros((0, *image.shape[:2]), dtype=bool)
    if kept:
        masks = mask_utils.decode([r["segmentation"] for r in kept]).transpose(2, 0, 1).astype(bool)
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray([r["category_id"] for r in kept], dtype=np.int64),
        "scores": np.asarray([r["score"] for r in kept], dtype=np.float32),
        "masks": masks,
        "class_names": [names.get(r["category_id"], str(r["category_id"])) for r in kept],
    }
