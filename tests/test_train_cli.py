"""`python -m platform.train` end to end: real local Ray Train, a real MLflow store, real images."""

import mlflow

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
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("train-smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert set(MaskRCNNConfig.__dataclass_fields__) <= set(run.data.params)
    assert run.data.params["phases"] == "('1:0',)"
    for key in ("bbox_AP", "segm_AP", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    version = client.get_model_version_by_alias("train-smoke-model", "champion")
    assert version.run_id == run.info.run_id


def test_amp_on_cpu_is_one_line_error():
    out = run_cli("platform.train", "--recipe", "dsb2018_demo", "amp=fp16")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: amp: 'fp16' needs GPUs (--gpus); on CPU use amp=off"]
