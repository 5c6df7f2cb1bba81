"""The platform beyond one machine, for real on this one: a two-node Ray cluster (`ray start --head` and a
second `ray start --address`, 1 CPU each), a PostgreSQL-backed MLflow server, and a small search submitted
with `python -m platform.launch`. Checks that the job succeeds, its trials run on both nodes, the server
holds the parent and nested runs and the registered model; and that a search whose second node is killed
mid-way still finishes every trial, the lost one continuing on the head from its last epoch checkpoint in
S3-compatible object storage.

Several minutes each on 2 CPU cores: marked slow (not in the default CI run) and cluster."""

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.cluster_fixtures import (
    MlflowServer,
    RayCluster,
    S3Store,
    kill_tree,
    log_tail,
    mlflow_server,
    postgres_cluster,
    s3_store,
    two_node_ray,
)
from tests.helpers import REPO, run_cli, sample_subset

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SMALL = ["min_size=128", "max_size=160", "box_detections_per_img=50"]  # as tests/test_tune_smoke.py
TRIALS = 2  # one per node: each node has 1 CPU and each trial's one worker takes 1


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> MlflowServer:
    root = tmp_path_factory.mktemp("cluster-mlflow")
    with postgres_cluster() as backend, mlflow_server(backend, root) as running:
        yield running


@pytest.fixture
def cluster(tmp_path) -> RayCluster:
    with two_node_ray(tmp_path, cpus_per_node=1) as running:
        yield running


def launch_argv(
    cluster: RayCluster, server: MlflowServer, root: Path, name: str, epochs: int, storage: str, *extra: str
) -> list[str]:
    """platform.launch of a tiny search: TRIALS trials at once, `epochs` epochs each (FIFO: every trial its
    full budget), 1 CPU per trial, checkpoints in `storage`, which both nodes reach."""
    data = sample_subset(root / "data", 4)
    return [
        "platform.launch", "--address", cluster.dashboard, "--tracking-uri", server.url,
        "--storage-path", storage, *extra, "--",
        "tune", "--space", "rpn_anchors", "--num-samples", str(TRIALS), "--max-epochs", str(epochs),
        "--scheduler", "fifo", "--concurrent-trials", str(TRIALS), "--cpus-per-worker", "1",
        "--data", str(data), "--experiment", name, "--register-as", f"{name}-model",
        "--recipe-out", str(root / "best.yaml"), *SMALL,
    ]  # fmt: skip


def launch_env(cluster: RayCluster) -> dict:
    return dict(cluster.env)  # no RAY_ADDRESS / MLFLOW_* of this process; token auth off as on the nodes


def node_ids(cluster: RayCluster) -> dict[str, str]:
    """{"head": id, "node2": id}, told apart by the custom resource each node was started with."""
    from ray.util.state import list_nodes

    ids = {}
    for node in list_nodes(address=cluster.dashboard, detail=True, limit=100):
        for name in ("head_node", "node2"):
            if name in node.resources_total:
                ids["head" if name == "head_node" else name] = node.node_id
    assert set(ids) == {"head", "node2"}, ids
    return ids


def train_workers(cluster: RayCluster) -> list:
    """Every Ray Train worker actor of the cluster so far, alive or dead, with its node."""
    from ray.util.state import list_actors

    return list_actors(
        address=cluster.dashboard,
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )


def search_runs(server: MlflowServer, experiment: str) -> tuple[list, list]:
    """(parent runs, nested runs) of `experiment` on the server; empty before the search created them."""
    client = mlflow.MlflowClient(server.url, server.url)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], []
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if r.data.tags.get("search_role") == "parent"]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, nested


def test_launched_search_spreads_over_both_nodes_and_records_on_the_server(server, cluster, tmp_path):
    import psycopg

    storage = str(tmp_path / "ray-results")  # one machine: a local folder is shared storage here
    out = run_cli(
        *launch_argv(cluster, server, tmp_path, "twonode", 1, storage), env=launch_env(cluster), timeout=1500
    )
    log = out.stdout[-6000:] + out.stderr[-6000:]
    assert out.returncode == 0, log
    assert "succeeded" in out.stderr.strip().splitlines()[-1], log
    assert "registered model: name=twonode-model version=1 alias=champion" in out.stdout, log

    ids = node_ids(cluster)
    workers = train_workers(cluster)
    assert {w.node_id for w in workers} == {ids["head"], ids["node2"]}, "trials ran on both nodes"

    parents, nested = search_runs(server, "twonode")
    # each trial's MLflow run says where it ran
    assert {r.data.tags["ray_nodes"] for r in nested} == {ids["head"], ids["node2"]}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(nested) == TRIALS and all(r.info.status == "FINISHED" for r in nested)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in nested)
    assert all("segm_AP" in r.data.metrics and r.data.params["min_size"] == "128" for r in nested)
    client = mlflow.MlflowClient(server.url, server.url)
    experiment_id = parents[0].info.experiment_id
    version = client.get_model_version_by_alias("twonode-model", "champion")
    assert version.version == "1"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"trials.csv", "best.yaml"} <= artifacts
    with psycopg.connect(server.backend_uri) as conn:  # held by the PostgreSQL store itself
        query = "select count(*) from runs join experiments using (experiment_id) where experiments.name = %s"
        assert conn.execute(query, ("twonode",)).fetchone()[0] == len(client.search_runs([experiment_id]))


@pytest.fixture
def store(tmp_path) -> S3Store:
    with s3_store(tmp_path) as running:
        yield running


def test_search_survives_losing_a_node(server, cluster, store, tmp_path):
    """Checkpoints in S3-compatible object storage (a real S3 server on 127.0.0.1), its endpoint and test
    credentials handed to the job with --env (real ones come from the nodes' role or environment): the
    lost trial continues on the head from the bucket."""
    epochs = 3
    ids = node_ids(cluster)
    storage = f"s3://{store.bucket}/ray"
    env = [arg for key, value in store.env.items() for arg in ("--env", f"{key}={value}")]
    argv = launch_argv(cluster, server, tmp_path, "lostnode", epochs, storage, *env)
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        launch = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO, env=launch_env(cluster), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        # Kill the second node once every trial has finished (and checkpointed) an epoch while a trial's
        # worker is still training there: its trial has epochs left, and a checkpoint to continue from.
        deadline = time.time() + 900
        while True:
            assert launch.poll() is None, "search ended before the node was lost:\n" + log_tail(log_path)
            assert time.time() < deadline, "no trial got going on both nodes:\n" + log_tail(log_path)
            _, nested = search_runs(server, "lostnode")
            training_on_node2 = any(
                w.node_id == ids["node2"] and w.state == "ALIVE" for w in train_workers(cluster)
            )
            if (
                len(nested) == TRIALS
                and all("segm_AP" in r.data.metrics for r in nested)
                and training_on_node2
            ):
                break
            time.sleep(1)
        cluster.worker.kill()
        code = launch.wait(timeout=1500)
    finally:
        if launch.poll() is None:
            kill_tree(launch)
    output = log_path.read_text()
    assert code == 0, output[-8000:]

    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster.dashboard, limit=100, raise_on_missing_output=False)
    dead = [n.node_id for n in nodes if n.state == "DEAD"]
    assert ids["node2"] in dead
    workers = train_workers(cluster)
    lost = [w for w in workers if w.node_id == ids["node2"]]
    assert lost and all(w.state == "DEAD" for w in lost)
    assert len(workers) > TRIALS, "the lost trial's worker group was started again"
    assert all(w.node_id == ids["head"] for w in workers if w.state == "ALIVE")

    parents, nested = search_runs(server, "lostnode")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(nested) == TRIALS and all(r.info.status == "FINISHED" for r in nested), "no trial lost"
    client = mlflow.MlflowClient(server.url, server.url)
    for run in nested:
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "segm_AP")}
        assert steps == set(range(1, epochs + 1)), (run.info.run_name, steps)  # every epoch, to the last
    resumed = [
        max((m.value for m in client.get_metric_history(r.info.run_id, "resumed_at_epoch")), default=0)
        for r in nested
    ]
    assert max(resumed) >= 1, "the lost trial continued from its checkpoint, not from scratch"
    assert output.count("completed") >= TRIALS, output[-4000:]
    # ... and says where it ran last: the head (node 2 is gone)
    moved = nested[resumed.index(max(resumed))]
    assert moved.data.tags["ray_nodes"] == ids["head"], moved.data.tags
    # ... from its checkpoints in the bucket (a trial's Train run is named after the trial, which its id ends)
    trial_id = moved.data.tags["trial_name"].rsplit("_", 1)[-1]
    assert any(trial_id in key and "/checkpoint_" in key for key in store.keys("ray/")), store.keys("ray/")
    assert not (tmp_path / "ray-results").exists(), "nothing went to a local folder"
