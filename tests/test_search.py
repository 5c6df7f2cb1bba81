"""Search features: grids, the champion rule (real MLflow store), and, through the CLI with a real local Ray:
a search whose driver is killed and resumed, and a thresholds search on cached predictions."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import mlflow
import pytest
from ray import tune

from tests.helpers import REPO, mlflow_uris_restored, run_cli, sample_subset
from trainers.search.settings import grid, grid_size


def test_grid_spans_each_domain():
    space = {
        "a": tune.choice(["x", "y", "z"]),
        "lr": tune.loguniform(1e-4, 1e-2),
        "p": tune.uniform(0.2, 0.6),
        "k": tune.randint(1, 6),  # 1..5
    }
    g = grid(space, 3)
    assert g["a"]["grid_search"] == ["x", "y", "z"]
    assert g["lr"]["grid_search"] == pytest.approx([1e-4, 1e-3, 1e-2])  # geometric for log-uniform
    assert g["p"]["grid_search"] == pytest.approx([0.2, 0.4, 0.6])
    assert g["k"]["grid_search"] == [1, 3, 5]
    assert grid_size(g) == 3 * 3 * 3 * 3
    assert grid({"k": tune.randint(0, 2)}, 5)["k"]["grid_search"] == [0, 1]  # integers de-duplicated


@pytest.mark.parametrize(
    ("given", "epochs", "first_rung"), [(None, 16, 4), (None, 4, 2), (None, 30, 7), (3, 16, 3)]
)
def test_ashas_first_rung_defaults_to_a_quarter_of_the_epochs(given, epochs, first_rung):
    from trainers.search.driver import grace_period

    assert grace_period(SimpleNamespace(grace_period=given), epochs) == first_rung


def test_default_modes():
    from platform.tune import default_mode

    assert [default_mode(m) for m in ("segm_AP", "kaggle_mAP", "val_loss", "val_ms_per_image")] == [
        "max",
        "max",
        "min",
        "min",
    ]


# ---- the champion rule -----------------------------------------------------------------------------------


@pytest.fixture
def detector_checkpoint(tmp_path):
    """A tiny random Mask R-CNN checkpoint and a config over 4 sample images (1 validation image)."""

    import torch

    from trainers.config import MaskRCNNConfig
    from trainers.detection.model import build_model
    from trainers.detection.train import save_checkpoint

    data = tmp_path / "data"
    sample_subset(data, 4)
    cfg = MaskRCNNConfig(
        data=str(data), backbone="resnet18_fpn", norm="group", min_size=64, max_size=64, box_score_thresh=0.0
    )
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_checkpoint(folder, cfg, build_model(cfg, 1), [{"id": 1, "name": "nucleus"}], {})
    from platform._cli import use_experiment

    with mlflow_uris_restored():
        experiment = use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "champion")  # artifacts in tmp
        yield folder, cfg, experiment


def test_champion_moves_only_to_a_better_model(detector_checkpoint):
    from deploy.champion import current_champion, evaluate_model, register_candidate

    folder, cfg, experiment = detector_checkpoint

    def candidate(value, config=cfg, mode="max"):
        with mlflow.start_run(experiment_id=experiment):
            return register_candidate(folder, "m", config, "segm_AP", mode, value)

    first = candidate(0.5)
    assert first.promoted and first.champion_version is None
    assert "alias=champion (first champion)" in first.message("segm_AP", 0.5)
    worse = candidate(0.4)
    assert not worse.promoted and worse.champion_version == "1" and worse.champion_value == 0.5
    assert worse.how.startswith("as registered")
    assert "without alias champion" in worse.message("segm_AP", 0.4)
    assert not candidate(0.5).promoted  # a tie does not beat the champion
    assert str(current_champion("m").version) == "1"
    better = candidate(0.6)
    assert better.promoted and str(current_champion("m").version) == str(better.version.version) == "4"
    assert "beats champion version 1" in better.message("segm_AP", 0.6)
    assert candidate(0.59, mode="min").promoted  # lower is better for a minimised metric
    # Other validation images: the champion's registered number does not count; it is evaluated on them.
    other = replace(cfg, val_fraction=0.5)
    measured = evaluate_model("models:/m/5", other)["segm_AP"]
    below = candidate(measured - 1e-6, other)
    assert not below.promoted and below.how.startswith("re-evaluated")
    assert below.champion_value == pytest.approx(measured)
    assert candidate(measured + 1e-3, other).promoted


# ---- a real search, killed and resumed; a thresholds search on its model -----------------------------------

NESTED_FINISHED = (
    "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
    "where t.key = 'mlflow.parentRunId' and r.status = 'FINISHED'"
)
# nested runs that are still running and have logged an epoch: a trial caught mid-training
NESTED_MID_TRAINING = (
    "select count(distinct r.run_uuid) from runs r join tags t on r.run_uuid = t.run_uuid "
    "join metrics m on m.run_uuid = r.run_uuid "
    "where t.key = 'mlflow.parentRunId' and r.status = 'RUNNING' and m.key = 'segm_AP'"
)


def _count(db, query) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):

    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    sample_subset(data, 4)
    db = root / "mlflow.db"
    uri = f"sqlite:///{db}"
    common = ["--tracking-uri", uri, "--storage-path", str(root / "ray")]
    argv = [
        sys.executable, "-m", "platform.tune", "--space", "optimizer", "--num-samples", "3",
        "--max-epochs", "3", "--scheduler", "fifo", "--data", str(data), "--experiment", "resume",
        "--register-as", "resumed", "--recipe-out", str(root / "best.yaml"), *common,
        "min_size=96", "max_size=96", "box_detections_per_img=50",
    ]  # fmt: skip
    log = open(root / "first.log", "w")
    driver = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    # Kill the driver for real (SIGKILL: no clean-up of its own) once one trial has finished and another
    # is mid-training with an epoch logged.
    while time.time() < deadline and driver.poll() is None:
        if _count(db, NESTED_FINISHED) >= 1 and _count(db, NESTED_MID_TRAINING) >= 1:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "ended before the kill: " + (root / "first.log").read_text()[-3000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    log.close()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume").experiment_id
    before = {
        r.info.run_name: (
            r.info.status,
            [m.value for m in client.get_metric_history(r.info.run_id, "segm_AP")],
        )
        for r in client.search_runs([experiment])
        if "mlflow.parentRunId" in r.data.tags
    }
    # Ray's own services of the killed driver are gone with it or go shortly; resume starts a fresh Ray.
    out = run_cli("platform.tune", "--resume", *common, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return root, uri, before, out


@pytest.mark.slow  # the killed-and-resumed search behind these takes ~5 min on 2 CPUs
def test_resume_finishes_the_killed_search(resumed):
    root, uri, before, out = resumed
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 3, "no trial lost, none doubled"
    assert all(c.info.status == "FINISHED" for c in children)
    finished_before = [name for name, (status, _) in before.items() if status == "FINISHED"]
    assert finished_before
    for child in children:
        history = client.get_metric_history(child.info.run_id, "segm_AP")
        assert [m.step for m in history] == [1, 2, 3], child.info.run_name  # one value per epoch: no re-run
        status, values = before.get(child.info.run_name, (None, []))
        assert [m.value for m in history][: len(values)] == values  # what was logged before is kept
        if status == "FINISHED":
            assert child.data.metrics.get("resumed_at_epoch", 0) == 0
    interrupted = [c for c in children if before.get(c.info.run_name, ("", []))[0] == "RUNNING"]
    assert interrupted and all(c.data.metrics["resumed_at_epoch"] >= 1 for c in interrupted), (
        "the interrupted trial continues from its checkpoint"
    )
    assert "resuming search optimizer-" in out.stdout
    assert "registered model: name=resumed version=1 alias=champion" in out.stdout


@pytest.mark.slow  # the killed-and-resumed search behind these takes ~5 min on 2 CPUs
def test_search_results_table_recipe_and_plots(resumed):
    root, uri, _, out = resumed
    from platform._cli import base_config
    from trainers.config import to_dict

    client = mlflow.MlflowClient(uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id], "tags.search_role = 'parent'"
    )[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    expected = {"trials.txt", "trials.csv", "best.yaml", "search_history.png", "parallel_coordinates.png"}
    assert expected <= artifacts, artifacts
    table = out.stdout[out.stdout.index("\n\ntrial ") + 2 :]
    assert table.count("completed") == 3 and "optimizer" in table.splitlines()[0]
    # The recipe file is the best trial's whole config, and is what platform.train --recipe reads.
    best_id = parent.data.params["best_trial"]
    best_run = client.search_runs([parent.info.experiment_id], f"tags.trial_name LIKE '%{best_id}'")[0]
    cfg = base_config(str(root / "best.yaml"), None, [])
    for key, value in to_dict(cfg).items():
        logged = best_run.data.params[key]
        if isinstance(value, tuple | list):
            assert logged.replace(" ", "").strip("()[]") in (",".join(map(str, value)), str(value)), key
        elif isinstance(value, float):
            assert math.isclose(float(logged), value), key
        else:
            assert str(value) == logged, key


@pytest.mark.slow  # the killed-and-resumed search behind these takes ~5 min on 2 CPUs
def test_thresholds_search_on_cached_predictions(resumed):
    root, uri, _, _ = resumed
    common = ["--tracking-uri", uri, "--storage-path", str(root / "ray"), "--experiment", "thr"]
    out = run_cli(
        "platform.tune", "--space", "thresholds", "--model", "models:/resumed@champion",
        "--register-as", "resumed", "--num-samples", "12", "--concurrent-trials", "2",
        "--metric", "kaggle_mAP,detections", "--mode", "max,min",
        "--recipe-out", str(root / "thr.yaml"), *common, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "cached in" in out.stdout and "Pareto front (kaggle_mAP max, detections min)" in out.stdout
    client = mlflow.MlflowClient(uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("thr").experiment_id], "tags.search_role = 'parent'"
    )[0]
    nested = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    trials = client.search_runs([parent.info.experiment_id], nested)
    assert len(trials) == 12 and all("kaggle_mAP" in t.data.metrics for t in trials)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.png", "pareto_front.txt", "param_importances.png"} <= artifacts
    version = client.get_model_version("resumed", "2")
    promoted = parent.data.params["promoted_to_champion"] == "True"
    champion = str(client.get_model_version_by_alias("resumed", "champion").version)
    assert champion == ("2" if promoted else "1")
    assert version.tags["metric"] == "kaggle_mAP"
    # Thresholds that keep nothing cannot beat the model's own: registered, but the alias stays.
    out = run_cli(
        "platform.tune", "--space", "thresholds", "--model", "models:/resumed/1", "--register-as", "resumed",
        "--num-samples", "2", "--metric", "kaggle_mAP", "--recipe-out", str(root / "none.yaml"), *common,
        "class_score_thresh=1.0", timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "version=3 without alias champion" in out.stdout and "does not beat" in out.stdout
    assert str(client.get_model_version_by_alias("resumed", "champion").version) == champion
