"""`python -m platform.train` end to end: real local Ray Train, a real MLflow store, real images."""

import re

import mlflow
import pytest

from tests.helpers import run_cli
from trainers.config import MaskRCNNConfig


def test_one_recipe_is_one_tracked_run(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_cli(
        "platform.train",
        "--recipe",
        "dsb2018_demo",
        "--data",
        str(tiny_dataset),
        "--tracking-uri",
        uri,
        "--experiment",
        "train-smoke",
        "--register-as",
        "train-smoke-model",
        "--storage-path",
        str(tmp_path / "ray"),
        "epochs=2",
        "min_size=128",
        "max_size=160",
        "anchor_sizes=8,16,32,64,128",
        "batch_size=1",
        "phases=1:0",
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "registered model: name=train-smoke-model version=1 alias=champion" in out.stdout
    assert "model (last epoch) vs baseline (otsu): segm_AP " in out.stdout
    # the console: a line per epoch; Ray's and the workers' output in the run's log file
    assert re.search(r"^epoch 2/2  segm_AP \d\.\d{4}  loss \d+\.\d{3}  best ", out.stdout, re.M), out.stdout
    assert "RayTrainWorker" not in out.stdout + out.stderr
    [log] = (tmp_path / "ray").glob("*/console.log")
    assert "RayTrainWorker" in log.read_text()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("train-smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert set(MaskRCNNConfig.__dataclass_fields__) <= set(run.data.params)
    assert run.data.params["phases"] == "('1:0',)"
    for key in ("baseline_segm_AP", "baseline_bbox_AP", "baseline_kaggle_mAP"):
        assert 0.0 < run.data.metrics[key] <= 1.0, key  # a threshold finds some of the nuclei
    for key in ("bbox_AP", "segm_AP", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert set(artifacts) == {f"plots/{n}.png" for n in ("loss_curves", "pr_bbox", "pr_segm", "predictions")}
    version = client.get_model_version_by_alias("train-smoke-model", "champion")
    assert version.run_id == run.info.run_id


def test_amp_on_cpu_is_one_line_error():
    out = run_cli("platform.train", "--recipe", "dsb2018_demo", "amp=fp16")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: amp: 'fp16' needs GPUs (--gpus); on CPU use amp=off or amp=bf16"
    ]


def test_seed_summary_is_mean_and_sample_std_of_shared_results():
    from platform.train import format_seed_table, seed_summary

    runs = [
        {"segm_AP": 0.2, "epoch": 3, "only_here": 1.0},
        {"segm_AP": 0.4, "epoch": 3},
        {"segm_AP": 0.6, "epoch": 3},
    ]
    summary = seed_summary(runs)
    assert set(summary) == {"segm_AP"}  # bookkeeping (epoch) and keys not in every run are left out
    mean, std = summary["segm_AP"]
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1))
    assert "segm_AP                  0.4000 +- 0.2000" in format_seed_table(summary, 3)


@pytest.mark.slow
def test_seeds_run_nested_runs_and_report_mean_and_std(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_cli(
        "platform.train", "--data", str(tiny_dataset), "--tracking-uri", uri, "--experiment", "seeds",
        "--storage-path", str(tmp_path / "ray"), "--seeds", "2",
        "epochs=1", "min_size=128", "max_size=160", "anchor_sizes=8,16,32,64,128", "batch_size=1",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "mean +- std over 2 seeds" in out.stdout
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    values = [r.data.metrics["segm_AP"] for r in children]
    assert parent[0].data.metrics["segm_AP_mean"] == pytest.approx(sum(values) / 2)
