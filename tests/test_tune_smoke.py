"""The main job end to end: real local Ray (Tune + Train), a real MLflow store, real images."""

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.helpers import run_cli, sample_subset
from trainers.config import MaskRCNNConfig


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):

    root = tmp_path_factory.mktemp("smoke")
    data = root / "data"
    sample_subset(data, 4)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = run_cli(
        "platform.tune",
        "--space",
        "rpn_anchors",
        "--num-samples",
        "2",
        "--max-epochs",
        "1",
        "--data",
        str(data),
        "--tracking-uri",
        uri,
        "--experiment",
        "smoke",
        "--register-as",
        "smoke-model",
        "--storage-path",
        str(root / "ray"),
        "--recipe-out",
        str(root / "best.yaml"),
        "min_size=128",
        "max_size=160",
        "box_detections_per_img=50",
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    mlflow.set_tracking_uri(uri)
    return out, uri, data


def test_prints_trial_table_and_registered_model(smoke):
    out, _, _ = smoke
    assert "bbox_AP" in out.stdout and "segm_AP" in out.stdout and "status" in out.stdout
    # The classical baseline is a row of the trial table and a line of its own, never a trial.
    [row] = [line for line in out.stdout.splitlines() if line.startswith("baseline (otsu)")]
    assert row.rstrip().endswith("baseline, not a model")
    assert "classical baseline (otsu) on the same validation images: segm_AP=" in out.stdout
    assert "registered model: name=smoke-model version=1 alias=champion" in out.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in out.stdout


def test_console_is_one_line_per_trial_epoch_and_the_rest_is_in_the_search_log(smoke):
    out, _, _ = smoke
    lines = out.stdout.splitlines()
    [hint] = [line for line in lines if line.startswith("full log (Ray, workers, warnings): ")]
    log = Path(hint.split(": ", 1)[1].split("  (--verbose")[0])
    assert log.name == "console.log" and log.parent.parent.name == "ray"  # in the search's own folder
    full = log.read_text()
    assert "Trial status" in full and "RayTrainWorker" in full  # Tune's tables, the workers' lines
    assert "Trial status" not in out.stdout + out.stderr and "RayTrainWorker" not in out.stdout + out.stderr
    epochs = [line for line in lines if re.match(r"trial [12]/2 \w+  epoch 1/1  segm_AP \d\.\d{4}  ", line)]
    assert len(epochs) == 2, out.stdout
    assert len(lines) + len(out.stderr.splitlines()) < 40, out.stdout + out.stderr


def test_parent_and_nested_runs_hold_params_and_metrics(smoke):
    _, uri, data = smoke
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    for child in children:
        assert set(MaskRCNNConfig.__dataclass_fields__) <= set(child.data.params)
        assert child.data.params["min_size"] == "128"
        for key in ("bbox_AP", "segm_AP", "segm_AP50", "bbox_AR50", "train_loss"):  # AR at max dets 50
            assert key in child.data.metrics, key
        history = client.get_metric_history(child.info.run_id, "segm_AP")
        assert [m.step for m in history] == [1]
    baseline = {k: v for k, v in parents[0].data.metrics.items() if k.startswith("baseline_")}
    assert {"baseline_segm_AP", "baseline_kaggle_mAP", "baseline_bbox_AP"} <= set(baseline)
    assert all(not k.startswith("baseline_") for child in children for k in child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"trials.csv", "trials.txt", "learning_curves.png", "search_history.png", "best.yaml"} <= artifacts
    # the runs table's Dataset column: the images every trial trained and validated on
    inputs = {i.tags[0].value: i.dataset for i in parents[0].inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    counts = {k: json.loads(d.profile)["images"] for k, d in inputs.items()}
    assert counts["training"] + counts["validation"] == 4 and counts["validation"] >= 1
    assert inputs["training"].name == f"{data.name} (training)" and inputs["training"].digest


def test_champion_loads_and_predicts(smoke):
    _, uri, data = smoke
    from datasets.mask_folders import load_image, read_mask_folders
    from deploy.registry import load_detector, predict_image

    version = mlflow.MlflowClient(uri).get_model_version_by_alias("smoke-model", "champion")
    assert str(version.version) == "1"
    detector = load_detector("models:/smoke-model@champion")
    assert detector.version == "1" and detector.categories == [{"id": 1, "name": "nucleus"}]
    image = load_image(read_mask_folders(data)[0].image_path)
    out = predict_image(detector, image)
    n = len(out["scores"])
    assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
    assert out["masks"].shape == (n, *image.shape[:2]) and out["masks"].dtype == np.bool_
    assert n <= 50
