"""Slice classifiers end to end through the CLIs, on real local Ray and a real MLflow store: train two
models (one on two DDP workers), combine them into a PatchEnsemble, register it, evaluate it on volumes
by its registry URI, and a small `classifier` search."""

import json
import os

import mlflow
import pytest

from tests.classifier_data import TINY, write_volumes
from tests.helpers import mlflow_uris_restored, run_cli


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier_cli")
    labels = write_volumes(root / "volumes")
    env = {**os.environ, "PLATFORM_SLICE_CACHE": str(root / "cache")}
    return root, labels, f"sqlite:///{root / 'mlflow.db'}", env


def overrides(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, **extra}.items()]


def train(setting, name: str, *extra: str):
    root, labels, uri, env = setting
    return run_cli(
        "platform.train", "--recipe", "adrenal3d_cpu", "--data", str(labels), "--tracking-uri", uri,
        "--experiment", "classifier-cli", "--storage-path", str(root / "ray"), "--register-as", name,
        *extra, env=env,
    )  # fmt: skip


@pytest.mark.slow  # ~3 min on 2 cores; the ensemble itself is tested in tests/test_ensemble.py
def test_train_ensemble_register_evaluate(setting):
    root, labels, uri, env = setting
    first = train(setting, "tiny-a", *overrides(seed=0))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "registered model: name=tiny-a version=1 alias=champion" in first.stdout
    assert "volume_auc=" in first.stdout
    # two DDP workers, and a head-only first epoch: DDP is re-wrapped when the backbone unfreezes
    second = train(
        setting,
        "tiny-b",
        "--workers",
        "2",
        *overrides(seed=1, model_name="mobilenetv3_small_050", head_epochs=1),
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    client = mlflow.MlflowClient(uri)
    run = client.get_run(client.get_model_version_by_alias("tiny-a", "champion").run_id)
    for key in ("val_loss", "slice_acc", "volume_acc", "volume_auc", "volume_f1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    expected = (
        "confusion_slice",
        "confusion_volume",
        "roc_slice",
        "roc_volume",
        "f1_per_class",
        "loss_curves",
    )
    assert plots == {f"plots/{n}.png" for n in expected}
    assert run.data.params["data"].endswith("index.csv")  # the workers got the cached slice index

    ensemble = run_cli(
        "platform.ensemble", "--models", "models:/tiny-a@champion", "models:/tiny-b@champion",
        "--method", "patch", "--calibrate", "f1", "--register-as", "tiny-patch", "--tracking-uri", uri,
        env=env,
    )  # fmt: skip
    assert ensemble.returncode == 0, ensemble.stdout[-3000:] + ensemble.stderr[-3000:]
    assert "patch: classes" in ensemble.stdout and "class weights: ball x" in ensemble.stdout
    assert "registered model: name=tiny-patch version=1 alias=champion" in ensemble.stdout
    table = ensemble.stdout.split("validation specimens")[1]
    assert "models:/tiny-a@champion" in table and table.splitlines()[2].startswith("ensemble")

    out = root / "volumes.csv"
    evaluated = run_cli(
        "platform.evaluate", "--model", "models:/tiny-patch@champion", "--data", str(labels),
        "--tracking-uri", uri, "--predictions-out", str(out), env=env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert "16 volumes" in evaluated.stdout
    rows = out.read_text().splitlines()
    assert rows[0] == "specimen,label,predicted,p_ball,p_box" and len(rows) == 17


@pytest.mark.slow  # ~2 min on 2 cores; the search driver is also run by test_tune_smoke and test_search
def test_classifier_search(setting):
    root, labels, uri, env = setting
    out = run_cli(
        "platform.tune", "--space", "classifier", "--data", str(labels), "--num-samples", "2",
        "--max-epochs", "2", "--tracking-uri", uri, "--experiment", "classifier-tune",
        "--storage-path", str(root / "ray"), *overrides(), env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "volume_auc" in out.stdout and "registered model: name=classifier-tune" in out.stdout


def test_one_line_errors(setting):
    root, labels, uri, env = setting
    wrong = run_cli("platform.tune", "--space", "classifier", "--recipe", "dsb2018_demo", env=env)
    assert wrong.returncode == 2 and "pick a recipe of the same kind" in wrong.stderr
    model = run_cli("platform.train", "--recipe", "adrenal3d_cpu", "model_name=resnet18x", env=env)
    assert model.returncode == 2
    assert model.stderr.strip().splitlines()[-1].startswith("error: model_name: 'resnet18x' is not a timm")
    bad = root / "bad.csv"
    bad.write_text("file,label\nmissing.nii.gz,ball\n")
    missing = run_cli("platform.train", "--recipe", "adrenal3d_cpu", "--data", str(bad), env=env)
    assert missing.returncode == 2 and "bad.csv row 2: volume missing.nii.gz not found" in missing.stderr


def test_a_classifier_run_logs_its_slices_as_dataset_inputs(setting, monkeypatch):
    """The runs table's Dataset column for classifiers: the training and validation slices of the run's split
    (the specimens of the two never overlap), counted per class."""
    root, labels, uri, env = setting
    from platform._cli import base_config
    from trainers.tracking import log_data_inputs

    monkeypatch.setenv("PLATFORM_SLICE_CACHE", env["PLATFORM_SLICE_CACHE"])
    cfg = base_config("adrenal3d_cpu", str(labels), overrides())
    with mlflow_uris_restored():  # no active experiment or URI left for later tests
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.MlflowClient().create_experiment("classifier-data")
        with mlflow.start_run(experiment_id=experiment) as run:
            log_data_inputs(cfg)
        inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    datasets = {i.tags[0].value: i.dataset for i in inputs}
    assert set(datasets) == {"training", "validation"}
    profiles = {k: json.loads(d.profile) for k, d in datasets.items()}
    assert profiles["training"]["specimens"] + profiles["validation"]["specimens"] == 16  # 8 balls, 8 boxes
    for profile in profiles.values():
        assert profile["slices"] == profile["class ball"] + profile["class box"] > 0
    assert datasets["training"].digest != datasets["validation"].digest
