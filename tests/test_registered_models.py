"""Only registered weights ever run: a logged platform model holds no pickle (MLflow "models from code"),
so even `mlflow.pyfunc.load_model` unpickles nothing of it; the platform's own loaders (resolve ->
load_detector / load_classifier: Serve replicas, evaluate, predict, ensemble, champion, the search driver)
read only the model's artifacts, tensors with weights_only=True; and a registered version made to run code
when unpickled (its python_model.pkl, or its model.pt) runs none of it there. Forged config.json,
categories.json, classes.json and ensemble files are one clear error naming the file."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from datasets.errors import UserError
from deploy.registry import load_classifier, load_detector, log_checkpoint, predict_image, register, resolve
from tests.helpers import RunsCode, mlflow_uris_restored, random_checkpoint, sample_subset, write_marker
from trainers.classification.model import build_classifier, save_classifier
from trainers.config import ClassifierConfig
from trainers.detection.combine import save_ensemble
from trainers.detection.inference import open_image
from trainers.detection.train import config_split


class PicklingModel(mlflow.pyfunc.PythonModel):
    """A pyfunc model logged the old way (cloudpickled python_model) whose unpickling runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return write_marker, (self.marker,)

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture
def store(tmp_path):
    with mlflow_uris_restored():
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        yield


@pytest.fixture
def detector_folder(tmp_path) -> Path:
    return random_checkpoint(tmp_path / "detector", sample_subset(tmp_path / "data", 2), seed=0)


def classifier_folder(folder: Path) -> Path:
    cfg = ClassifierConfig(model_name="resnet18")
    folder.mkdir()
    save_classifier(folder, cfg, build_classifier(cfg, 2).state_dict(), ["benign", "malignant"])
    return folder


def registered(folder: Path, name: str, **log_model) -> str:
    """Log and register `folder` (the platform's way, or mlflow.pyfunc.log_model with `log_model`)."""
    with mlflow.start_run():
        if log_model:
            info = mlflow.pyfunc.log_model(name="model", pip_requirements=["mlflow"], **log_model)
        else:
            info = log_checkpoint(folder)
    register(info.model_uri, name)
    return f"models:/{name}@champion"


def test_logged_models_hold_no_pickle_and_load_with_pickles_disallowed(
    store, detector_folder, tmp_path, monkeypatch
):
    uri = registered(detector_folder, "det")
    classifier_uri = registered(classifier_folder(tmp_path / "cls"), "cls")
    for model in (uri, classifier_uri):
        local = Path(mlflow.artifacts.download_artifacts(model))
        assert not [p.name for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]
        flavour = (local / "MLmodel").read_text()
        assert "model_code_path" in flavour and "python_model:" not in flavour
    # MLflow unpickles a python_model unless this is false: it is, and our models load all the same.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    image = open_image(config_split(load_detector(uri).config)[1][0].image_path)
    answer = mlflow.pyfunc.load_model(uri).predict([image])[0]
    expected = predict_image(load_detector(uri), image)
    assert set(answer) == set(expected) and np.array_equal(answer["labels"], expected["labels"])
    assert np.allclose(answer["scores"], expected["scores"])
    slices = [np.zeros((64, 64), np.uint8), np.full((64, 64), 200, np.uint8)]
    probabilities = mlflow.pyfunc.load_model(classifier_uri).predict(slices)
    assert np.allclose(probabilities, load_classifier(classifier_uri).predict_proba(slices))


def test_a_registered_pickle_that_runs_code_is_never_unpickled(store, detector_folder, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = shutil.copytree(detector_folder, tmp_path / "checkpoint")  # MLflow keeps the folder's name
    uri = registered(
        detector_folder,
        "forged",
        python_model=PicklingModel(marker),
        artifacts={"checkpoint": str(checkpoint)},
    )
    marker.unlink(missing_ok=True)
    assert (resolve(uri) / "model.pt").is_file()
    detector = load_detector(uri)  # what Serve replicas, evaluate, predict and the champion rule call
    assert detector.version == "1" and detector.categories
    assert not marker.exists(), "the platform unpickled the registered python_model"
    # The control: MLflow itself would have run it (so the test above can fail).
    with pytest.raises(Exception):  # noqa: B017  (write_marker returns no model: MLflow then fails)
        mlflow.pyfunc.load_model(uri)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["detector", "classifier"])
def test_weights_whose_pickle_runs_code_are_refused(store, detector_folder, tmp_path, kind):
    folder = detector_folder if kind == "detector" else classifier_folder(tmp_path / "cls")
    marker = tmp_path / "marker"
    torch.save({"weight": RunsCode(marker)}, folder / "model.pt")
    uri = registered(folder, f"forged-{kind}")
    load = load_detector if kind == "detector" else load_classifier
    refused = r"model\.pt is not a readable torch state_dict \(it holds Python objects besides tensors"
    with pytest.raises(UserError, match=refused):
        load(uri)
    assert not marker.exists()


def rewrite(path: Path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", [1, 2], "expected an object of MaskRCNNConfig keys, got list"),
        ("config.json", {"min_size": "large"}, "key 'min_size' expects an integer, got 'large'"),
        ("config.json", {"min_size": 1_000_000}, "min_size: expected at most 8192 pixels"),
        ("config.json", '{"min_size": 256', "not valid JSON"),
        ("config.json", b"\xff\xfe{}", "not a JSON text file"),
        ("categories.json", {"id": 1, "name": "x"}, "expected a non-empty list of categories, got dict"),
        ("categories.json", [{"id": "1", "name": "x"}], r"\[0\]: field 'id' must be int, got str"),
        ("categories.json", [{"id": 1, "name": 7}], r"\[0\]: field 'name' must be str, got int"),
        ("categories.json", [{"id": True, "name": "x"}], r"\[0\]: field 'id' must be int, got bool"),
        ("categories.json", [{"id": 0, "name": "x"}], "'id' must be a positive integer, got 0"),
        ("categories.json", [{"id": 1, "name": "x"}] * 2, "category id 1 repeats"),
        ("categories.json", [{"id": i, "name": str(i)} for i in range(1, 100_001)], "lists 100000"),
        ("model.pt", {"a": 1}, "holds a dict, expected a state_dict of named tensors"),
        ("model.pt", {"roi_heads.box_predictor.cls_score.bias": torch.zeros(2)}, "do not fit the model"),
    ],
)
def test_forged_detector_files_are_one_clear_error(detector_folder, file, content, message):
    path = detector_folder / file
    if file == "model.pt":
        torch.save(content, path)
    elif file == "config.json" and isinstance(content, dict):
        rewrite(path, {**json.loads(path.read_text()), **content})
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        rewrite(path, content)
    with pytest.raises(UserError, match=message) as error:
        load_detector(str(detector_folder), "cpu")
    assert file in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('"benign"', "expected a list of at least two class names"),
        ([1, 2], "expected a list of at least two class names"),
        (["a", "a"], "class name 'a' repeats"),
        (["a", "b", "c"], r"a head of \(2,\) outputs, but .*classes.json lists 3 classes"),
    ],
)
def test_forged_classes_are_one_clear_error(tmp_path, content, message):
    folder = classifier_folder(tmp_path / "cls")
    rewrite(folder / "classes.json", content)
    with pytest.raises(UserError, match=message) as error:
        load_classifier(str(folder), "cpu")
    assert "classes.json" in str(error.value)


@pytest.mark.parametrize("member", ["../outside", "/etc", "..", "link"])
def test_ensemble_members_stay_inside_the_ensemble(detector_folder, tmp_path, member):
    ensemble = save_ensemble(tmp_path / "ensemble", [detector_folder])
    (ensemble / "link").symlink_to(detector_folder)  # a whole checkpoint, but outside the folder
    spec = json.loads((ensemble / "detector_ensemble.json").read_text())
    rewrite(ensemble / "detector_ensemble.json", {**spec, "members": [member]})
    with pytest.raises(UserError, match="detector_ensemble.json: member"):
        load_detector(str(ensemble), "cpu")
