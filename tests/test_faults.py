"""Faults for real: a Ray Train worker process is SIGKILLed mid-run and the run completes from its last
checkpoint (kept in S3-compatible object storage: a real S3 server on 127.0.0.1); a driver stopped with
Ctrl-C (SIGINT) is continued with `--resume` into the same MLflow run."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from tests.cluster_fixtures import s3_store
from tests.helpers import REPO

EPOCHS = 3
SMALL = ["min_size=128", "max_size=160", "anchor_sizes=8,16,32,64,128", "batch_size=1"]


class TrainProcess:
    """`python -m platform.train` in the background, its output collected as it comes."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "platform.train", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def run_id(self, timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if line.startswith("MLflow run "):
                    return line.split()[2]
            assert self.proc.poll() is None, self.output()
            time.sleep(0.5)
        raise AssertionError("no run id printed:\n" + self.output())

    def output(self) -> str:
        return "".join(self.lines)[-6000:]


def train_args(dataset: Path, tmp_path: Path, *extra: str, storage: str | None = None) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [
        "--data",
        str(dataset),
        "--tracking-uri",
        uri,
        "--storage-path",
        storage or str(tmp_path / "ray"),
        "--experiment",
        "faults",
        *extra,
        f"epochs={EPOCHS}",
        *SMALL,
    ]


def wait_for_epochs(client, run_id: str, proc: TrainProcess, at_least: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(client.get_metric_history(run_id, "epoch"))
        if done >= at_least:
            return done
        assert proc.proc.poll() is None, proc.output()
        time.sleep(0.2)
    raise AssertionError(f"fewer than {at_least} epochs reported in {timeout} s:\n{proc.output()}")


def train_worker_pids() -> list[int]:
    """Ray names its actor processes `ray::ClassName...` (setproctitle rewrites /proc/PID/cmdline)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
    return pids


def epochs_logged(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch"))


def test_killed_worker_restarts_from_last_checkpoint(tiny_dataset, tmp_path):
    """With --storage-path in object storage: the restarted worker downloads the checkpoint it continues
    from, and the driver downloads the final one to log it as the run's model."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    with s3_store(tmp_path) as store:
        storage = f"s3://{store.bucket}/ray"
        args = train_args(tiny_dataset, tmp_path, "--max-failures", "1", storage=storage)
        proc = TrainProcess(*args, env=store.env)
        run_id = proc.run_id()
        done_before_kill = wait_for_epochs(client, run_id, proc, at_least=1)
        pids = train_worker_pids()
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        proc.proc.wait(timeout=600)
        assert proc.proc.returncode == 0, proc.output()
        run = client.get_run(run_id)
        assert run.data.tags["ray_storage_path"] == storage
        name = run.data.tags["ray_run_name"]
        last = max(key for key in store.keys(f"ray/{name}/checkpoint_") if key.endswith("/model.pt"))
        final_weights = store.read(last)

    assert epochs_logged(client, run_id) == list(range(1, EPOCHS + 1))  # every epoch once, none lost
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_at_epoch")]
    # The restarted group resumed at the last checkpoint written before the kill (or a later one): the
    # kill cost at most the epoch that was running.
    assert max(resumed) >= done_before_kill, resumed
    assert train_worker_pids() == []
    assert not (tmp_path / "ray").exists(), "nothing went to a local folder"
    # The run's logged model is the bucket's last checkpoint (downloaded by the driver).
    mlflow.set_tracking_uri(uri)
    [model] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.source_run_id == run_id
    logged = Path(mlflow.artifacts.download_artifacts(f"{model.artifact_location}/artifacts/checkpoint"))
    assert (logged / "model.pt").read_bytes() == final_weights
    assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/loss_curves.png"}
    # Where the workers ran: this machine's one Ray node (its 56-hex-digit id).
    assert re.fullmatch(r"[0-9a-f]{56}", run.data.tags["ray_nodes"]), run.data.tags["ray_nodes"]
    assert run.data.tags["ray_node_ips"]


@pytest.mark.slow  # ~2 min on 2 cores; resuming a run is also covered in-process by tests/test_resume.py
def test_interrupted_run_resumes_into_the_same_mlflow_run(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    proc = TrainProcess(*train_args(tiny_dataset, tmp_path))
    run_id = proc.run_id()
    wait_for_epochs(client, run_id, proc, at_least=1)
    proc.proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.proc.wait(timeout=120)
    assert proc.proc.returncode != 0, proc.output()
    stopped_at = len(epochs_logged(client, run_id))
    assert stopped_at < EPOCHS, "the run finished before it was interrupted"
    assert client.get_run(run_id).info.status != "FINISHED"

    resumed = TrainProcess("--resume", run_id, "--tracking-uri", uri)
    resumed.proc.wait(timeout=600)
    assert resumed.proc.returncode == 0, resumed.output()
    assert epochs_logged(client, run_id) == list(range(1, EPOCHS + 1))
    assert client.get_run(run_id).info.status == "FINISHED"
    experiment = client.get_experiment_by_name("faults")
    assert len(client.search_runs([experiment.experiment_id])) == 1  # continued, not a second run
    after = [m.value for m in client.get_metric_history(run_id, "resumed_at_epoch") if m.step > stopped_at]
    assert after and min(after) >= 1, after
