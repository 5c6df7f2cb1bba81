"""Real servers for the cluster tests: a throw-away PostgreSQL on 127.0.0.1 (`mlflow/server.sh
local-postgres`), an MLflow tracking server on it (`mlflow/server.sh serve`), an S3-compatible object
store (moto's server), and a local two-node Ray cluster (`ray start --head` plus a second
`ray start --address`), each torn down with every process it started."""

import contextlib
import glob
import importlib.util
import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from platform.serve import free_port
from tests.helpers import REPO

SERVER_SH = REPO / "mlflow" / "server.sh"
RAY = Path(sys.executable).with_name("ray")


def _stats() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, parent pid, process group, session) of every process, from /proc (Linux)."""
    table = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        table[int(stat.split("/")[2])] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child nobody reaped holds no resources)."""
    state = _stats().get(pid)
    return state is not None and state[0] != "Z"


def members(leader: int) -> set[int]:
    """Live processes that `leader` (started with start_new_session=True) started: its session and process
    group, and every descendant (a Ray worker may get a process group of its own)."""
    table = _stats()
    found = {pid for pid, (_, _, pgid, sid) in table.items() if leader in (pgid, sid)}
    found |= {leader} if leader in table else set()
    grew = True
    while grew:
        children = {pid for pid, (_, ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return {pid for pid in found if table[pid][0] != "Z"}


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM everything `proc` started (see `members`), SIGKILL what is left after `grace` seconds, and
    wait until none of it lives."""
    seen = members(proc.pid)
    signal_all(seen, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline:
        seen |= members(proc.pid)
        if not any(map(alive, seen)):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    # A child whose parent died is re-parented out of the tree: kill everything seen at any point.
    signal_all({pid for pid in seen | members(proc.pid) if alive(pid)}, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.time() + 10
    while any(map(alive, seen)) and time.time() < deadline:
        time.sleep(0.1)
    left = sorted(pid for pid in seen if alive(pid))
    assert not left, f"processes of {proc.args[:2]} left: {left}"


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


# ---- PostgreSQL + MLflow server ------------------------------------------------------------------------


def skip_without_postgres() -> None:
    """Skip (with the fix in the message) where the PostgreSQL server or MLflow's driver is missing."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("PostgreSQL server binaries not installed (apt-get install -y postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip(
            "psycopg (PostgreSQL driver of MLflow's SQLAlchemy) not installed: pip install 'psycopg[binary]'"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run PostgreSQL as (it refuses root)")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free 127.0.0.1 port, as `mlflow/server.sh local-postgres` makes it;
    yields its backend URI (database `mlflow`); stopped and deleted afterwards."""
    skip_without_postgres()
    # Under /tmp, not pytest's tmp_path: as root the server runs as user postgres, which cannot traverse
    # pytest's 0700 /tmp/pytest-of-root.
    folder = Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
    env = {**os.environ, "PG_PORT": str(free_port())}
    try:
        out = subprocess.run(
            [str(SERVER_SH), "local-postgres", str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr + log_tail(folder / "postgres.log")
        yield out.stdout.strip()
    finally:
        subprocess.run([str(SERVER_SH), "stop-postgres", str(folder)], capture_output=True, timeout=60)
        pid_file = folder / "data" / "postmaster.pid"
        if pid_file.exists():  # not stopped cleanly: kill the postmaster (its backends follow it)
            pid = int(pid_file.read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 10
            while alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            assert not alive(pid), f"PostgreSQL postmaster {pid} survived SIGKILL"
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@dataclass
class MlflowServer:
    url: str  # tracking URI of the server: http://127.0.0.1:PORT
    backend_uri: str  # its PostgreSQL backend store
    artifacts: str  # its artifact destination: a local folder or an s3:// URI
    log: Path


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, root: Path, artifacts: str | None = None, env: dict | None = None
) -> Iterator[MlflowServer]:
    """`mlflow/server.sh serve` on a free 127.0.0.1 port over `backend_uri`, artifacts under `root` (or at
    the `artifacts` destination, such as s3://..., with `env` added to the server's environment); one
    uvicorn worker (this runs on 2-core CI machines). Yields once /health answers; every process of the
    server is gone afterwards."""
    port = free_port()
    artifacts = artifacts or str(root / "artifacts")
    log = root / f"mlflow-server-{port}.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(SERVER_SH), "serve", "--backend-store-uri", backend_uri, "--port", str(port),
             "--artifacts-destination", str(artifacts), "--workers", "1"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120  # a fresh database gets MLflow's whole schema first (~15 s here)
        while True:
            assert proc.poll() is None, "MLflow server exited:\n" + log_tail(log)
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.time() < deadline, "MLflow server not healthy after 120 s:\n" + log_tail(log)
            time.sleep(0.5)
        yield MlflowServer(url, backend_uri, artifacts, log)
    finally:
        kill_tree(proc)


# ---- an S3-compatible object store ---------------------------------------------------------------------


@dataclass
class S3Store:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict  # what a client needs: endpoint, (dummy) credentials, region

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@contextlib.contextmanager
def s3_store(root: Path, bucket: str = "foram-results") -> Iterator[S3Store]:
    """moto's S3 server (a real HTTP server speaking the S3 API, objects in memory) on a free 127.0.0.1
    port with one bucket; clients reach it through AWS_ENDPOINT_URL, as they would MinIO or Ceph."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,  # boto3 (MLflow) and pyarrow (Ray) both read it
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance metadata service to ask here
    }
    log = root / f"s3-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not _answers(f"{endpoint}/moto-api/"):
            assert proc.poll() is None, "moto server exited:\n" + log_tail(log)
            assert time.time() < deadline, "moto server not answering after 60 s:\n" + log_tail(log)
            time.sleep(0.3)
        store = S3Store(endpoint, bucket, env)
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        kill_tree(proc)


# ---- a local two-node Ray cluster ------------------------------------------------------------------------


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen  # `ray start --block`: leads a session holding all of the node's processes
    temp_dir: Path
    log: Path

    def kill(self) -> None:
        """The node lost for real: SIGKILL every process of it at once (raylet, its workers, agents)."""
        signal_all(members(self.proc.pid), signal.SIGKILL)
        self.proc.wait(timeout=30)


@dataclass
class RayCluster:
    head: RayNode
    worker: RayNode
    gcs_address: str  # 127.0.0.1:PORT, what `ray start --address` joins
    dashboard: str  # http://127.0.0.1:PORT, what `platform.launch --address` and the job/state APIs use
    env: dict  # the environment the nodes run with (PATH has this venv first: job entrypoints say `python`)


def _ray_ports() -> list[str]:
    # Two nodes on one machine: every port a node would otherwise take by default (dashboard agent 52365,
    # metrics, runtime-env agent, ...) is given explicitly so the second node does not collide with the first.
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--min-worker-port=0",  # workers on random ports: two raylets would share the default range
        "--max-worker-port=0",
        "--object-store-memory=200000000",
    ]


def _start_node(name: str, args: list[str], root: Path, env: dict) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))  # short: Ray's socket paths
    log = root / f"ray-{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        )  # fmt: skip
    return RayNode(name, proc, temp_dir, log)


def _wait_for_nodes(dashboard: str, count: int, nodes: list[RayNode], timeout: float = 180) -> None:
    from ray.util.state import list_nodes

    deadline = time.time() + timeout
    while True:
        for node in nodes:
            assert node.proc.poll() is None, f"ray node {node.name} exited:\n" + log_tail(node.log)
        with contextlib.suppress(Exception):  # the dashboard comes up after the GCS
            if len(list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])) >= count:
                return
        assert time.time() < deadline, "\n".join(f"{n.name}:\n{log_tail(n.log)}" for n in nodes)
        time.sleep(1)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _current_cluster() -> str | None:
    """What `ray.init()` without an address on this machine would join (another user's Ray, or nothing)."""
    path = Path("/tmp/ray/ray_current_cluster")
    return path.read_text() if path.exists() else None


@contextlib.contextmanager
def two_node_ray(root: Path, cpus_per_node: int = 1) -> Iterator[RayCluster]:
    """A head node (custom resource `head_node`) and a second node (`node2`) on this machine, each with its
    own --temp-dir so that nothing is written to /tmp/ray (ray_current_cluster there would send every later
    `ray.init()` on this machine to this cluster) and nothing else's Ray is touched; no `ray stop` (it
    stops every Ray on the machine): each node's processes are killed as the tree of its `ray start`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Explicitly off: Ray 2.60 turns token auth on for a head started where ~/.ray/auth_token exists, and
    # a second node (and every client) would then need the token too.
    env["RAY_AUTH_MODE"] = "disabled"
    before = _current_cluster()
    port, dashboard_port = free_port(), free_port()
    gcs = f"127.0.0.1:{port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    nodes: list[RayNode] = []
    try:
        head = _start_node(
            "head",
            ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dashboard_port}",
             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
             f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--resources=" + json.dumps({"head_node": 1}),
             *_ray_ports()],
            root, env,
        )  # fmt: skip
        nodes.append(head)
        _wait_for_nodes(dashboard, 1, nodes)
        worker = _start_node(
            "node2",
            [f"--address={gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=0",
             "--resources=" + json.dumps({"node2": 1}), *_ray_ports()],
            root, env,
        )  # fmt: skip
        nodes.append(worker)
        _wait_for_nodes(dashboard, 2, nodes)
        deadline = time.time() + 60  # the job API answers once the head's job agent is up
        while not _answers(f"{dashboard}/api/jobs/"):
            assert time.time() < deadline, "the job API never answered:\n" + log_tail(head.log)
            time.sleep(1)
        yield RayCluster(head, worker, gcs, dashboard, env)
    finally:
        for node in reversed(nodes):
            kill_tree(node.proc)
        for node in nodes:
            subprocess.run(["rm", "-rf", str(node.temp_dir)], check=False)
        assert _current_cluster() == before, "/tmp/ray/ray_current_cluster was changed"
