"""Model registry seam: log a trained Mask R-CNN as an MLflow pyfunc model, register it under an alias,
load it back by URI (`models:/NAME@champion`) and predict. Ray Serve deployments load through here."""

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

from trainers.config import MaskRCNNConfig
from trainers.loop import CHECKPOINT_FILES, load_checkpoint_model

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


def register(model_uri: str, name: str, alias: str = "champion") -> ModelVersion:
    version = mlflow.register_model(model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def load_detector(uri: str) -> Detector:
    """Load `models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/...` or a local model folder."""
    wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    name = version = None
    if uri.startswith("models:/"):
        name, _, ref = uri.removeprefix("models:/").partition("@")
        client = mlflow.MlflowClient()
        if ref:
            version = str(client.get_model_version_by_alias(name, ref).version)
        else:
            name, _, version = name.partition("/")
    return Detector(wrapper.model, wrapper.categories, wrapper.config, wrapper.device, uri, name, version)


@torch.inference_mode()
def predict_image(
    detector, image: np.ndarray, score_threshold: float = 0.0, mask_threshold: float = 0.5
) -> dict:
    """HxWx3 uint8 (or HxW grey) -> {boxes Nx4 xyxy, labels N, scores N, masks NxHxW bool, class_names N}."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float().div(255)
    out = detector.model([tensor.to(detector.device)])[0]
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
