"""Run any platform command on a Ray cluster as a Ray job: this checkout is the job's working_dir, the
command's output streams here, and the exit code is the command's.

    python -m platform.launch --address ray://HEAD:10001 -- tune --space rpn_anchors --num-samples 20
    python -m platform.launch --address http://HEAD:8265 --gpus-per-trial 1 --workers-per-trial 2 \\
        --storage-path /mnt/efs/ray --tracking-uri http://mlflow.internal:5000 \\
        -- tune --space optimizer
    python -m platform.launch --no-wait --storage-path /shared/ray \\
        -- train --recipe foram_maskrcnn --data /shared/foram
    ray job logs --follow --address http://HEAD:8265 JOB_ID           # follow a --no-wait job later

--address is the cluster's Ray Client address (ray://HEAD:10001) or its dashboard (http://HEAD:8265); jobs
are submitted to the dashboard, on port 8265 of the host a ray:// address names. --gpus-per-trial,
--workers-per-trial and --storage-path are handed to the command (train: --gpus, --workers; a run is one
trial); --tracking-uri (default $MLFLOW_TRACKING_URI) reaches the command and every Ray worker as
MLFLOW_TRACKING_URI. Paths in the command's arguments are paths on the cluster. Ctrl-C stops the job.
"""

import argparse
import asyncio
import functools
import importlib
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from datasets.errors import UserError
from platform import _cli

DESCRIPTION = __doc__.split("\n\n")[0]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DASHBOARD_PORT = 8265  # Ray's default; give http://HOST:PORT for another
CLUSTER_PORTS = {6379, 10001}  # GCS and Ray Client ports: a bare HOST:PORT with one of them names the head
NOT_COMMANDS = {"__init__", "_cli", "launch"}

# launch flag -> the command's option it becomes, the first one the command's parser has. A platform.train
# run is one trial: its --gpus (in all) and --workers are what a search gives each trial.
MAPPED = {
    "gpus_per_trial": ("--gpus-per-trial", "--gpus"),
    "workers_per_trial": ("--workers-per-trial", "--workers"),
    "storage_path": ("--storage-path",),
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.launch",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        usage="%(prog)s [options] -- COMMAND [its arguments]",
    )
    p.add_argument(
        "--address",
        help=f"ray://HEAD:10001 or http://HEAD:8265 (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    p.add_argument("--working-dir", help="the checkout shipped as the job's working_dir (default: this one)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (train: GPUs of the run)")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (train: workers of the run)")
    p.add_argument(
        "--storage-path",
        help="checkpoints and Tune state: a path every node mounts (EFS, NFS, a ReadWriteMany volume) "
        "or a bucket, s3://BUCKET/PREFIX",
    )
    p.add_argument("--tracking-uri", help="MLflow server the job records to (default: $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more environment for the job and its workers (visible in the Ray dashboard: no secrets)",
    )
    p.add_argument(
        "--entrypoint-num-gpus",
        type=float,
        help="GPUs for the command's own process (evaluate, ensemble: they compute in it)",
    )
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs for the command's own process")
    p.add_argument(
        "--pip-pins",
        action="store_true",
        help="install pyproject.toml's pinned dependencies (all but ray) in the job's runtime environment: "
        "for a cluster on Ray's own images",
    )
    p.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="e.g. tune --space NAME")
    return p


@dataclass
class Job:
    """What is submitted: the entrypoint, its runtime_env and the driver's resources."""

    entrypoint: str
    runtime_env: dict
    command: str
    warnings: list[str] = field(default_factory=list)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None


def pinned_requirements(pyproject: Path | None = None) -> list[str]:
    """pyproject.toml's pinned dependencies without ray: a job cannot change the Ray its cluster runs (the
    image's, which must be the pinned one)."""
    import tomllib

    with open(pyproject or _cli.REPO / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return [d for d in dependencies if re.split(r"[\[=<>~!; ]", d, maxsplit=1)[0].lower() != "ray"]


def commands() -> list[str]:
    """The platform's commands: the modules of this package with a parser."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in NOT_COMMANDS)


@functools.cache
def command_parser(command: str) -> argparse.ArgumentParser:
    valid = commands()
    if command not in valid:
        raise UserError(f"unknown command '{command}' after --; valid: {', '.join(valid)}")
    return importlib.import_module(f"platform.{command}").build_parser()


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _given(args: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def command_args(command: str, args: list[str], mapped: dict[str, object]) -> list[str]:
    """`args` with each mapped launch flag that has a value appended as the command's own option; the
    result is checked with the command's parser here, before anything is submitted."""
    parser = command_parser(command)
    options = _options(parser)
    out = list(args)
    for name, value in mapped.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        option = next((o for o in MAPPED[name] if o in options), None)
        if option is None:
            raise UserError(
                f"{flag}: python -m platform.{command} takes none of {', '.join(MAPPED[name])}; "
                f"leave {flag} out for this command"
            )
        if _given(args, option):
            raise UserError(
                f"{flag} given twice: to platform.launch and to {command} as {option}; give it once"
            )
        out += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    # Argument mistakes are the command's own usage error (exit 2) here, not a failed job minutes later.
    parser.parse_args(out)
    return out


def dashboard_url(address: str) -> str:
    """The job API of the cluster at `address`: http(s)://... as given; ray://HOST[:PORT] and a bare
    HOST[:PORT] (the head's GCS or Ray Client port) -> http://HOST:8265; a bare HOST:PORT with another
    port is taken to be the dashboard itself."""
    address = address.strip()
    if address in ("", "auto", "local"):
        return DEFAULT_ADDRESS
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme in ("http", "https"):
        return address.rstrip("/")
    if parts.scheme not in ("", "ray"):
        raise UserError(
            f"--address: expected ray://HOST:10001 or http://HOST:8265 (the dashboard), got '{address}'"
        )
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"--address: bad port in '{address}'") from None
    if not parts.hostname:
        raise UserError(f"--address: no host in '{address}'; expected ray://HOST:10001 or http://HOST:8265")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if parts.scheme == "ray" or port is None or port in CLUSTER_PORTS:
        port = DASHBOARD_PORT
    return f"http://{host}:{port}"


def _local_store(uri: str) -> bool:
    return "://" not in uri or uri.startswith(("sqlite:", "file:"))


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def build_job(args: argparse.Namespace, dashboard: str) -> Job:
    """The job for parsed launch arguments: every user mistake is a UserError here, before any upload."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command or command[0].startswith("-"):
        raise UserError(
            "no command to run: python -m platform.launch [options] -- COMMAND [its arguments]; "
            f"COMMAND is one of {', '.join(commands())}"
        )
    name, rest = command[0], command[1:]
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial: expected a number >= 0, got {args.gpus_per_trial:g}")
    if args.workers_per_trial is not None and args.workers_per_trial < 1:
        raise UserError(f"--workers-per-trial: expected a positive integer, got {args.workers_per_trial}")
    mapped = {k: getattr(args, k) for k in MAPPED}
    rest = command_args(name, rest, mapped)

    working_dir = Path(args.working_dir).expanduser().resolve() if args.working_dir else _cli.REPO
    if not (working_dir / "platform" / "__init__.py").is_file():
        raise UserError(
            f"--working-dir: {working_dir} is not a checkout of this project (no platform/__init__.py)"
        )
    from trainers.ray_seam import WORKING_DIR_EXCLUDES

    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise UserError(f"--env: expected KEY=VALUE, got '{item}'")
        env[key] = value
    warnings = []
    options = _options(command_parser(name))
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
        if _local_store(tracking):
            warnings.append(
                f"tracking URI {tracking} is a file on this machine: the cluster sees it only on a shared "
                "filesystem; an MLflow server (mlflow/server.sh) is the way to share runs"
            )
        elif _loopback(tracking) and not _loopback(dashboard):
            warnings.append(f"tracking URI {tracking} means each cluster node itself there, not this machine")
    elif "--tracking-uri" in options and not _given(rest, "--tracking-uri"):
        warnings.append(
            "no --tracking-uri or MLFLOW_TRACKING_URI: the job records into an SQLite store in its temporary "
            "copy of the checkout on the cluster, lost with it"
        )
    # (a resumed search keeps the storage path it started with)
    if "--storage-path" in options and not _given(rest, "--storage-path") and not _given(rest, "--resume"):
        warnings.append(
            "no --storage-path: checkpoints go to .ray_results/ in the job's temporary copy of the checkout "
            "on the head node (not shared with other nodes, lost with it); give a path every node mounts"
        )
    runtime_env = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env:
        runtime_env["env_vars"] = env
    if args.pip_pins:
        pins = pinned_requirements(working_dir / "pyproject.toml")
        runtime_env["pip"] = {"packages": pins, "pip_check": False}
    return Job(
        entrypoint=shlex.join(["python", "-m", f"platform.{name}", *rest]),
        runtime_env=runtime_env,
        command=name,
        warnings=warnings,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
    )


def connect(dashboard: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The client prefers RAY_ADDRESS / RAY_API_SERVER_ADDRESS to the address it is given: the address
    # resolved here (from --address, or RAY_ADDRESS itself) must win.
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    with_token = _send_token_if_available()
    try:
        client = JobSubmissionClient(dashboard)
    except AuthenticationError:
        raise UserError(
            f"--address: the cluster at {dashboard} wants a Ray auth token: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or put the cluster's token in ~/.ray/auth_token)"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--address: no Ray job server answers at {dashboard} ({first}); is the cluster up and its "
            f"dashboard port reachable (e.g. kubectl port-forward svc/HEAD-svc 8265)?"
        ) from None
    if not with_token:  # it answered a request that carried no token: so does it everyone else's
        print(
            f"warning: the cluster at {dashboard} takes jobs without a Ray auth token: whoever reaches its "
            "dashboard or GCS runs code on it; start it with RAY_AUTH_MODE=token (deploy/cluster/README.md)",
            file=sys.stderr,
        )
    return client


def _send_token_if_available() -> bool:
    """Send the Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when there is one
    and RAY_AUTH_MODE is unset, as `ray start` does: Ray 2.60 clusters started where a token exists
    require it, and its job client sends it only in token mode. Whether a token is sent."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return False
    # Its note "Token authentication is enabled for this Ray cluster" is about a cluster it starts: none here.
    logger = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)


def follow(client, job_id: str, out=None) -> int:
    """Stream the job's output until it ends; its exit code: 0 when it succeeded, the command's own exit
    code when it failed (2 = a user error, as run locally), else 1. Ctrl-C stops the job: 130."""

    out = out or sys.stdout

    async def stream():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        try:
            asyncio.run(stream())
        except RuntimeError as e:  # the log connection broke; the job may still be running
            print(
                f"lost the log stream of job {job_id} ({str(e).splitlines()[0]}); waiting for it",
                file=sys.stderr,
            )
        while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
            time.sleep(2)
    except KeyboardInterrupt:
        try:
            client.stop_job(job_id)
            print(f"stopped job {job_id}", file=sys.stderr)
        except RuntimeError as e:  # it ended meanwhile, or the cluster is gone
            print(f"could not stop job {job_id}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded", file=sys.stderr)
        return 0
    message = " ".join(str(info.message or "").split())[:500]
    print(f"job {job_id} {status.lower()}: {message or 'no message'}", file=sys.stderr)
    code = getattr(info, "driver_exit_code", None)
    return code if status == "FAILED" and isinstance(code, int) and code > 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dashboard = dashboard_url(args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)
    job = build_job(args, dashboard)
    for warning in job.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    client = connect(dashboard)
    try:
        job_id = client.submit_job(
            entrypoint=job.entrypoint,
            runtime_env=job.runtime_env,
            metadata={"platform_command": job.command},
            entrypoint_num_cpus=job.entrypoint_num_cpus,
            entrypoint_num_gpus=job.entrypoint_num_gpus,
        )
    except (RuntimeError, ValueError) as e:  # an upload over Ray's size limit, a refused runtime_env, ...
        raise UserError(
            f"the cluster at {dashboard} refused the job: {str(e).strip().splitlines()[0]}"
        ) from None
    print(f"job {job_id} on {dashboard}: {job.entrypoint}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(f"follow: ray job logs --follow --address {dashboard} {job_id}")
        print(f"stop:   ray job stop --address {dashboard} {job_id}")
        return 0
    return follow(client, job_id)


if __name__ == "__main__":
    _cli.run(main)
