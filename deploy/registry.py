"""Model registry seam: log a trained Mask R-CNN, slice classifier or classifier ensemble as an MLflow pyfunc
model, register it under an alias, load it back by URI (`models:/NAME@champion`) and predict. Ray Serve
deployments load through here."""

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

from datasets.errors import UserError
from trainers.classification.ensemble import Ensemble, is_classifier_folder, load_predictor
from trainers.classification.model import SliceClassifier
from trainers.config import MaskRCNNConfig
from trainers.detection.model import CHECKPOINT_FILES, load_checkpoint_model
from trainers.detection.postprocess import filter_output

REPO = Path(__file__).resolve().parents[1]
LOCAL_STORE = REPO / ".mlflow"  # embedded MLflow: SQLite file + artifact folder, git-ignored


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store inside the checkout."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    LOCAL_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


class MaskRCNNPyfunc(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(uri).predict([image, ...])` -> one dict of numpy arrays per image.

    Loading needs this checkout importable (run from the repo root), as the platform itself does.
    """

    # predict takes a list of numpy images, which MLflow's type-hint schemas cannot describe; without
    # this, every import printed its advice to add type hints (its own filter overrides ours).
    _skip_type_hint_validation = True

    def load_context(self, context):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.config, self.categories = load_checkpoint_model(
            Path(context.artifacts["checkpoint"]), device
        )
        self.device = device

    def predict(self, context, model_input, params=None):
        return [predict_image(self, image) for image in model_input]


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


def _requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def log_detector(checkpoint_dir: Path, artifact_name: str = "model") -> ModelInfo:
    """Log a checkpoint folder as a pyfunc model in the active MLflow run."""
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "checkpoint"
        slim.mkdir()
        for name in CHECKPOINT_FILES:
            shutil.copy2(checkpoint_dir / name, slim / name)
        # Explicit requirements: MLflow's inference would import-trace the model in a subprocess.
        return mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=MaskRCNNPyfunc(),
            artifacts={"checkpoint": str(slim)},
            pip_requirements=_requirements(),
        )


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(uri).predict([slice, ...])` -> N x C class probabilities (a single
    classifier or an ensemble; `classes` of the unwrapped model names the columns)."""

    _skip_type_hint_validation = True  # as MaskRCNNPyfunc's

    def load_context(self, context):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = load_predictor(Path(context.artifacts["classifier"]), device)

    def predict(self, context, model_input, params=None):
        return self.predictor.predict_proba(model_input)


def log_classifier(folder: Path, artifact_name: str = "model") -> ModelInfo:
    """Log a classifier checkpoint folder or an ensemble folder (without optimizer state)."""
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "classifier"
        shutil.copytree(folder, slim, ignore=shutil.ignore_patterns("train_state.pt", ".*"))
        return mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=ClassifierPyfunc(),
            artifacts={"classifier": str(slim)},
            pip_requirements=_requirements(),
        )


def log_checkpoint(folder: Path, artifact_name: str = "model") -> ModelInfo:
    """Log whatever a training run checkpointed: a classifier (classes.json) or a detector."""
    folder = Path(folder)
    if is_classifier_folder(folder):
        return log_classifier(folder, artifact_name)
    return log_detector(folder, artifact_name)


def register(model_uri: str, name: str, alias: str = "champion") -> ModelVersion:
    version = mlflow.register_model(model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def load_detector(uri: str) -> Detector:
    """Load `models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/...` or a local model folder."""
    wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    name, version = registry_version(uri)
    return Detector(wrapper.model, wrapper.categories, wrapper.config, wrapper.device, uri, name, version)


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


def version_info(name: str, version: str) -> dict:
    """What the registry says about one model version: aliases, its metrics (the run's latest values and
    the registered validation metric, tags val_<metric>), and when it was registered."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    for key, value in mv.tags.items():
        if key.startswith("val_") and key != "val_data":
            try:
                metrics[key] = float(value)
            except ValueError:
                pass
    return {
        "name": name,
        "version": str(version),
        "aliases": sorted(mv.aliases),
        "metric": mv.tags.get("metric"),
        "metrics": {k: metrics[k] for k in sorted(metrics)},
        "run_id": mv.run_id,
        "registered_at_ms": mv.creation_timestamp,
    }


def load_classifier(value: str, device: str | None = None) -> SliceClassifier | Ensemble:
    """A classifier or ensemble (folder, or registered/logged model URI), ready to `predict_proba`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_predictor(classifier_folder(value), device)


@torch.inference_mode()
def predict_image(
    detector, image: np.ndarray, score_threshold: float = 0.0, mask_threshold: float = 0.5
) -> dict:
    """HxWx3 uint8 (or HxW grey) -> {boxes Nx4 xyxy, labels N, scores N, masks NxHxW bool, class_names N}.
    The detector config's class_score_thresh and mask_min_area apply (trainers/detection/postprocess.py), then
    `score_threshold`."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float().div(255)
    out = detector.model([tensor.to(detector.device)])[0]
    out = filter_output(out, detector.config, detector.categories, mask_threshold)
    keep = out["scores"] >= score_threshold
    names = {c["id"]: c["name"] for c in detector.categories}
    labels = out["labels"][keep].cpu().numpy()
    return {
        "boxes": out["boxes"][keep].cpu().numpy(),
        "labels": labels,
        "scores": out["scores"][keep].cpu().numpy(),
        "masks": (out["masks"][keep, 0] >= mask_threshold).cpu().numpy(),
        "class_names": [names.get(int(label), str(label)) for label in labels],
    }


def classifier_folder(value: str) -> Path:
    """The local folder of a classifier or ensemble given as a folder or an MLflow model URI (downloaded
    from the store); UserError naming the value when it is neither."""
    path = Path(value).expanduser()
    if path.is_dir() and is_classifier_folder(path):
        return path.resolve()
    if ":/" not in value:
        raise UserError(
            f"{value}: not a classifier checkpoint or ensemble folder (no classes.json or ensemble.json) "
            "and not an MLflow model URI (models:/NAME@alias, runs:/RUN_ID/model)"
        )
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=value))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise UserError(f"{value}: cannot load: {str(e).splitlines()[0]}") from None
    folder = local / "artifacts" / "classifier"
    if not is_classifier_folder(folder):
        raise UserError(f"{value}: not a classifier model (no classifier artifact)")
    return folder


def is_classifier(value: str) -> bool:
    """Whether a --model value (folder or MLflow URI) is a classifier or ensemble (else a detector)."""
    try:
        classifier_folder(value)
    except UserError:
        return False
    return True
