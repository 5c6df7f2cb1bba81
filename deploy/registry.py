"""Model registry seam: log a trained Mask R-CNN, slice classifier or classifier ensemble as an MLflow pyfunc
model, register it under an alias, load it back by URI (`models:/NAME@champion`) and predict. Ray Serve
deployments load through here."""

import shutil
import tempfile
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models.model import ModelInfo

from datasets.errors import UserError
from trainers.classifier import SliceClassifier
from trainers.config import MaskRCNNConfig
from trainers.ensemble import Ensemble, is_classifier_folder, load_predictor
from trainers.loop import CHECKPOINT_FILES, load_checkpoint_model
from trainers.postprocess import filter_output

# Our predict takes a list of numpy images, which MLflow's type-hint schemas cannot describe; its advice
# to add type hints would otherwise print on every log and load.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")

REPO = Path(__file__).resolve().parents[1]


class MaskRCNNPyfunc(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(uri).predict([image, ...])` -> one dict of numpy arrays per image.

    Loading needs this checkout importable (run from the repo root), as the platform itself does.
    """

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


def load_classifier(value: str, device: str | None = None) -> SliceClassifier | Ensemble:
    """A classifier or ensemble (folder, or registered/logged model URI), ready to `predict_proba`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_predictor(classifier_folder(value), device)


@torch.inference_mode()
def predict_image(
    detector, image: np.ndarray, score_threshold: float = 0.0, mask_threshold: float = 0.5
) -> dict:
    """HxWx3 uint8 (or HxW grey) -> {boxes Nx4 xyxy, labels N, scores N, masks NxHxW bool, class_names N}.
    The detector config's class_score_thresh and mask_min_area apply (trainers/postprocess.py), then
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
