"""platform.launch without a cluster: address mapping, how launch flags become the command's options, the
job's entrypoint and runtime_env, the one-line user errors, and how a job's end becomes the exit code.
The real submission to a two-node Ray cluster is tests/test_cluster.py."""

import os
import shlex
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from datasets.errors import UserError
from platform import launch
from platform.serve import free_port
from tests.helpers import REPO, run_cli
from trainers.ray_seam import WORKING_DIR_EXCLUDES


@pytest.mark.parametrize(
    "address, url",
    [
        ("ray://10.0.0.5:10001", "http://10.0.0.5:8265"),
        ("ray://head.internal", "http://head.internal:8265"),
        ("http://10.0.0.5:8265", "http://10.0.0.5:8265"),
        ("https://ray.example.org/", "https://ray.example.org"),
        ("10.0.0.5:6379", "http://10.0.0.5:8265"),  # the GCS address RAY_ADDRESS often holds
        ("10.0.0.5", "http://10.0.0.5:8265"),
        ("127.0.0.1:9000", "http://127.0.0.1:9000"),  # another port: the dashboard itself
        ("ray://[::1]:10001", "http://[::1]:8265"),
        ("auto", "http://127.0.0.1:8265"),
    ],
)
def test_dashboard_url(address, url):
    assert launch.dashboard_url(address) == url


@pytest.mark.parametrize("address", ["grpc://h:1", "ray://:10001", "s3://bucket", "ray://h:port"])
def test_bad_address_names_the_flag(address):
    with pytest.raises(UserError, match="--address"):
        launch.dashboard_url(address)


def test_commands_are_the_platform_modules():
    assert {"tune", "train", "evaluate", "ensemble", "data", "serve", "bench"} <= set(launch.commands())
    assert "launch" not in launch.commands() and "_cli" not in launch.commands()


def parse(*argv: str):
    return launch.build_parser().parse_args(list(argv))


def job(*argv: str, dashboard: str = "http://10.0.0.5:8265") -> launch.Job:
    return launch.build_job(parse(*argv), dashboard)


def test_tune_job_gets_the_mapped_flags_checkout_and_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    j = job(
        "--gpus-per-trial", "1", "--workers-per-trial", "2", "--storage-path", "s3://bucket/ray",
        "--tracking-uri", "http://mlflow.internal:5000", "--env", "NCCL_DEBUG=INFO",
        "--", "tune", "--space", "rpn_anchors", "--data", "/shared/my data", "lr=0.01",
    )  # fmt: skip
    argv = shlex.split(j.entrypoint)
    assert argv[:3] == ["python", "-m", "platform.tune"]
    assert argv[3:8] == ["--space", "rpn_anchors", "--data", "/shared/my data", "lr=0.01"]
    assert argv[8:] == [
        "--gpus-per-trial",
        "1",
        "--workers-per-trial",
        "2",
        "--storage-path",
        "s3://bucket/ray",
    ]
    assert j.runtime_env["working_dir"] == str(REPO)
    assert j.runtime_env["excludes"] == WORKING_DIR_EXCLUDES  # as init_ray ships the checkout
    assert j.runtime_env["env_vars"] == {
        "NCCL_DEBUG": "INFO",
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    }
    assert j.command == "tune" and j.warnings == []


def test_train_takes_the_per_trial_flags_as_its_own(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    j = job("--gpus-per-trial", "0.5", "--workers-per-trial", "4", "--storage-path", "/shared/ray", "train")
    assert shlex.split(j.entrypoint)[3:] == [
        "--gpus",
        "0.5",
        "--workers",
        "4",
        "--storage-path",
        "/shared/ray",
    ]
    assert j.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}  # from the env


def test_warnings_for_what_the_cluster_cannot_keep_or_reach(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    warnings = job("--", "tune", "--space", "rpn_anchors").warnings
    assert any("no --tracking-uri" in w for w in warnings) and any("no --storage-path" in w for w in warnings)
    assert "env_vars" not in job("--", "tune").runtime_env
    warnings = job("--tracking-uri", "sqlite:///x.db", "--storage-path", "/s", "--", "tune").warnings
    assert len(warnings) == 1 and "file on this machine" in warnings[0]
    warnings = job("--tracking-uri", "http://127.0.0.1:5000", "--storage-path", "/s", "--", "tune").warnings
    assert len(warnings) == 1 and "each cluster node itself" in warnings[0]
    local = job(
        "--tracking-uri",
        "http://127.0.0.1:5000",
        "--storage-path",
        "/s",
        "tune",
        dashboard="http://127.0.0.1:8265",
    )
    assert local.warnings == []
    assert job("--tracking-uri", "http://m:5000", "--", "data", "inspect", "x").warnings == []  # no storage


def test_pip_pins_and_resume(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    j = job("--pip-pins", "--storage-path", "/s", "--tracking-uri", "http://m:5000", "--", "tune")
    assert j.runtime_env["pip"] == {"packages": launch.pinned_requirements(), "pip_check": False}
    assert not any(p.startswith("ray") for p in j.runtime_env["pip"]["packages"])
    assert "pip" not in job("--", "tune").runtime_env
    # A resumed search keeps the storage path it started with: no warning about a missing one.
    resumed = job("--tracking-uri", "http://m:5000", "--", "tune", "--resume", "rpn_anchors-20260101-000000")
    assert resumed.warnings == []


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no command to run"),
        (["--", "--space", "x"], "no command to run"),
        (["--", "frobnicate"], "unknown command 'frobnicate' after --; valid: bench, data"),
        (
            ["--gpus-per-trial", "1", "--", "data", "inspect", "x"],
            "--gpus-per-trial: python -m platform.data takes",
        ),
        (
            ["--storage-path", "/s", "--", "evaluate", "--model", "m", "--data", "d"],
            "--storage-path: python -m",
        ),
        (["--gpus-per-trial", "1", "--", "tune", "--gpus-per-trial=2"], "--gpus-per-trial given twice"),
        (["--workers-per-trial", "1", "--", "train", "--workers", "2"], "--workers-per-trial given twice"),
        (["--gpus-per-trial", "-1", "--", "tune"], "--gpus-per-trial: expected a number >= 0"),
        (["--workers-per-trial", "0", "--", "tune"], "--workers-per-trial: expected a positive integer"),
        (["--env", "NOVALUE", "--", "tune"], "--env: expected KEY=VALUE"),
        (["--working-dir", "/", "--", "tune"], "--working-dir: / is not a checkout"),
    ],
)
def test_user_errors_name_the_flag(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        job(*argv)


def test_command_argument_mistakes_are_the_commands_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        job("--", "tune", "--no-such-flag")
    assert exit_info.value.code == 2
    assert "python -m platform.tune: error: unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_cli_unreachable_cluster_is_one_error_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = run_cli(
        "platform.launch", "--address", address, "--storage-path", "/s", "--tracking-uri", "http://m:5000",
        "--", "tune", "--space", "rpn_anchors", env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: --address: no Ray job server answers at {address}"), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("mode, warned", [("disabled", True), ("token", False)])
def test_a_cluster_that_takes_jobs_without_a_token_is_named(monkeypatch, capsys, mode, warned):
    """Only the launcher's side, with a stand-in for Ray's client: a cluster that answered a client sending
    no token answers everyone; tests/test_cluster.py submits to a real one."""
    import ray.job_submission

    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: SimpleNamespace())
    launch.connect("http://127.0.0.1:8265")
    err = capsys.readouterr().err
    assert ("takes jobs without a Ray auth token" in err) == warned, err


# ---- following a job: only the control flow, with a stand-in for Ray's JobSubmissionClient -----------------


@dataclass
class FakeJobs:
    status: str
    exit_code: int | None = None
    logs: tuple[str, ...] = ("line 1\n", "line 2\n")
    interrupt: bool = False  # Ctrl-C while the logs stream
    stopped: bool = False

    async def tail_job_logs(self, job_id):
        for chunk in self.logs:
            yield chunk
        if self.interrupt:
            raise KeyboardInterrupt

    def get_job_status(self, job_id):
        return SimpleNamespace(value=self.status)

    def get_job_info(self, job_id):
        return SimpleNamespace(message=f"job ended {self.status}", driver_exit_code=self.exit_code)

    def stop_job(self, job_id):
        self.stopped = True
        return True


@pytest.mark.parametrize(
    "status, exit_code, expected",
    [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("STOPPED", None, 1)],
)
def test_follow_streams_and_returns_the_jobs_exit_code(status, exit_code, expected, capsys):
    assert launch.follow(FakeJobs(status, exit_code), "raysubmit_1") == expected
    out = capsys.readouterr()
    assert out.out == "line 1\nline 2\n"
    assert out.err.strip().splitlines()[-1].startswith(f"job raysubmit_1 {status.lower()}")


def test_ctrl_c_stops_the_job(capsys):
    jobs = FakeJobs("RUNNING", interrupt=True)
    assert launch.follow(jobs, "raysubmit_2") == 130
    assert jobs.stopped and "stopped job raysubmit_2" in capsys.readouterr().err
