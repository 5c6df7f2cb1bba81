"""The shared tracking server for real: `mlflow/server.sh` over a throw-away PostgreSQL on 127.0.0.1, used
through the MLflow client as the platform uses it (nested runs, artifacts through the server's proxy, the
Model Registry with an alias), artifacts in S3-compatible storage, and the platform's default tracking URI
pointing at it. No Ray."""

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.cluster_fixtures import SERVER_SH, MlflowServer, mlflow_server, postgres_cluster, s3_store
from tests.helpers import mlflow_uris_restored


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> MlflowServer:
    root = tmp_path_factory.mktemp("mlflow-server")
    with postgres_cluster() as backend, mlflow_server(backend, root) as running:
        yield running


@pytest.fixture(autouse=True)
def restore_mlflow_uris():
    with mlflow_uris_restored():
        yield


class Doubler(mlflow.pyfunc.PythonModel):
    """The smallest real pyfunc model: predict(x) = 2 x."""

    def predict(self, model_input: list[float], params=None) -> list[float]:
        return [2 * x for x in model_input]


def test_nested_runs_artifacts_and_registry(server, tmp_path):
    import psycopg

    client = mlflow.MlflowClient(server.url)
    mlflow.set_tracking_uri(server.url)
    mlflow.set_registry_uri(server.url)
    experiment = mlflow.create_experiment("server-check")
    # Artifacts go through the server (mlflow-artifacts:/), not to a path only the server's machine has.
    assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:/")
    (tmp_path / "table.txt").write_text("trial  segm_AP\n0  0.5\n")
    with mlflow.start_run(experiment_id=experiment, run_name="search") as parent:
        mlflow.set_tags({"search_role": "parent"})
        mlflow.log_param("space", "rpn_anchors")
        mlflow.log_artifact(str(tmp_path / "table.txt"))
        for trial in range(2):
            with mlflow.start_run(experiment_id=experiment, run_name=f"trial_{trial}", nested=True):
                mlflow.log_params({"lr": 0.01 * (trial + 1), "trial": trial})
                for epoch in (1, 2):
                    mlflow.log_metric("segm_AP", 0.1 * epoch + trial, step=epoch)
        info = mlflow.pyfunc.log_model(name="model", python_model=Doubler(), pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, "server-check-model")
    client.set_registered_model_alias("server-check-model", "champion", version.version)

    # Read back through the server.
    runs = client.search_runs([experiment])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert {c.data.params["trial"] for c in children} == {"0", "1"}
    history = client.get_metric_history(children[0].info.run_id, "segm_AP")
    assert [m.step for m in history] == [1, 2]
    local = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="table.txt", dst_path=tmp_path / "dl"
    )
    assert open(local).read().startswith("trial  segm_AP")
    champion = client.get_model_version_by_alias("server-check-model", "champion")
    assert champion.version == version.version
    model = mlflow.pyfunc.load_model("models:/server-check-model@champion")
    assert model.predict([1.0, 2.5]) == [2.0, 5.0]

    # The store really is PostgreSQL (and the artifacts are in the server's destination folder).
    with psycopg.connect(server.backend_uri) as conn:
        query = "select count(*) from runs where experiment_id = %s"
        assert conn.execute(query, (int(experiment),)).fetchone()[0] == 3
        aliases = conn.execute("select name, alias, version from registered_model_aliases").fetchall()
    assert ("server-check-model", "champion", int(version.version)) in aliases
    assert list(Path(server.artifacts).rglob("table.txt")), "not in the server's artifact destination"


def test_artifacts_in_s3_compatible_storage(server, tmp_path):
    """The same database, a server whose artifact destination is a bucket (a real S3 server on 127.0.0.1):
    clients without any S3 credentials log and read artifacts through the server, and they are objects
    in the bucket."""
    with (
        s3_store(tmp_path) as store,
        mlflow_server(
            server.backend_uri, tmp_path, artifacts=f"s3://{store.bucket}/mlflow", env=store.env
        ) as s3_server,
    ):
        assert not {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} & set(os.environ)  # this client has no S3 access
        mlflow.set_tracking_uri(s3_server.url)
        experiment = mlflow.create_experiment("server-s3")
        (tmp_path / "curve.txt").write_text("epoch segm_AP\n1 0.25\n")
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifact(str(tmp_path / "curve.txt"), "plots")
        keys = [k for k in store.keys("mlflow/") if k.endswith("/plots/curve.txt")]
        assert len(keys) == 1 and run.info.run_id in keys[0], keys
        assert store.read(keys[0]) == (tmp_path / "curve.txt").read_bytes()
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="plots/curve.txt", dst_path=tmp_path / "dl"
        )
        assert Path(local).read_bytes() == (tmp_path / "curve.txt").read_bytes()


def test_platform_default_tracking_uri_is_the_server(server, monkeypatch):
    """Every platform command resolves its store through deploy.registry.default_tracking_uri
    (platform/_cli.tracking_uri): MLFLOW_TRACKING_URI points them all at the server."""
    from deploy.registry import default_tracking_uri
    from platform import _cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    assert default_tracking_uri() == server.url
    assert _cli.tracking_uri(None) == server.url
    assert _cli.tracking_uri("sqlite:///elsewhere.db") == "sqlite:///elsewhere.db"  # --tracking-uri wins
    experiment = _cli.use_experiment(_cli.tracking_uri(None), "platform-default")
    created = mlflow.MlflowClient(server.url).get_experiment(experiment)
    assert created.name == "platform-default" and created.artifact_location.startswith("mlflow-artifacts:/")


def test_server_script_user_errors():
    def run(*args):
        return subprocess.run([str(SERVER_SH), *args], capture_output=True, text=True, timeout=30)

    out = run("serve")
    assert out.returncode == 2 and out.stderr.startswith("error: serve: --backend-store-uri")
    out = run("serve", "--backend-store-uri", "sqlite:///x.db")
    assert out.returncode == 2 and "must be a postgresql:// URI" in out.stderr
    out = run("serve", "--backend-store-uri", "postgresql://u:secret@h/db", "--port", "http")
    assert out.returncode == 2 and "--port expects a number" in out.stderr and "secret" not in out.stderr
    out = run("frobnicate")
    assert out.returncode == 2 and "valid: serve, upgrade, local-postgres, stop-postgres" in out.stderr
    assert "local-postgres" in run("--help").stdout
