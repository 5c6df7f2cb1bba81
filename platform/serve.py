"""Serve the registered detector and classifier over HTTP with Ray Serve (deploy/app.py).

    python -m platform.serve                                     # the demo's models:/dsb2018_quick@champion
    python -m platform.serve --detector models:/nuclei@champion --classifier models:/adrenal@champion
    python -m platform.serve --config deploy/serve.yaml --port 8080   # the file `serve run` also takes
    python -m platform.serve --classifier models:/adrenal@champion --library ../shared/data/adrenal3d/volumes
    # then open http://127.0.0.1:8000/ : the page (segment & count, classify, find in 3D)
    curl -F file=@image.png 'http://127.0.0.1:8000/v1/segment?score_threshold=0.5'
    curl -H 'Content-Type: application/octet-stream' --data-binary @volume.nii.gz \
        'http://127.0.0.1:8000/v1/classify?top_k=3'
    python -m platform.serve --host 0.0.0.0 --allowed-hosts gpu1.lab --auth-token-file ~/.foram-token
    curl -H "Authorization: Bearer $(cat ~/.foram-token)" -F file=@image.png http://gpu1.lab:8000/v1/segment

Settings: ServeSettings defaults < the config file's application `args` < these flags. Only registered
models are served (models:/NAME@alias or models:/NAME/VERSION). Ctrl-C stops the application and Ray.
"""

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

from datasets.errors import UserError
from deploy.access import LOOPBACK, TOKEN_ENV, read_token
from platform import _cli

DESCRIPTION = __doc__.split("\n\n")[0]
DEFAULT_DETECTOR = "models:/dsb2018_quick@champion"  # what `make demo` registers
APP_NAME = "foram"  # the application's name in Serve (deploy/serve.yaml names it so too)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.serve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--detector", help=f"registered Mask R-CNN (default {DEFAULT_DETECTOR} if nothing is given)"
    )
    p.add_argument(
        "--classifier", help="registered slice classifier or ensemble, e.g. models:/adrenal@champion"
    )
    p.add_argument("--library", help="a folder of NIfTI volumes to find slices in (the page's Find in 3D)")
    p.add_argument("--library-step", type=int, help="keep every n-th slice in the library (default 1)")
    p.add_argument(
        "--config", help="a Ray Serve config YAML (deploy/serve.yaml): its first application's args"
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster to run on (default: a local Ray)")
    p.add_argument(
        "--tracking-uri", help="MLflow store with the registry (default: MLFLOW_TRACKING_URI or .mlflow)"
    )
    p.add_argument(
        "--reload-on-alias", action="store_true", default=None, help="follow the alias to new versions"
    )
    p.add_argument("--reload-interval", type=float, help="seconds between alias checks (default 10)")
    p.add_argument("--detector-replicas", type=int)
    p.add_argument("--classifier-replicas", type=int)
    p.add_argument("--cpus-per-replica", type=float, help="per model replica (default 1)")
    p.add_argument(
        "--gpus-per-replica", type=float, help="per model replica; fractions share a GPU (default 0)"
    )
    p.add_argument(
        "--max-batch-size", type=int, help="tiles/slices per model call; 1 = no batching (default 8)"
    )
    p.add_argument("--max-pixels", type=int, help="largest image accepted, in pixels")
    p.add_argument("--max-upload-mb", type=float, help="largest request body accepted")
    p.add_argument(
        "--auth-token-file", help=f"file with the bearer token /v1/ requests must send (or ${TOKEN_ENV})"
    )
    p.add_argument(
        "--allowed-hosts",
        help="comma-separated Host names answered (default 127.0.0.1,localhost,[::1]; *: any)",
    )
    p.add_argument("--request-timeout", type=float, help="seconds a request may take, upload included (300)")
    return p


# flag -> ServeSettings field
_FLAGS = {
    "detector": "detector",
    "classifier": "classifier",
    "library": "library",
    "library_step": "library_step",
    "tracking_uri": "tracking_uri",
    "reload_on_alias": "reload_on_alias",
    "reload_interval": "reload_interval_s",
    "detector_replicas": "detector_replicas",
    "classifier_replicas": "classifier_replicas",
    "cpus_per_replica": "cpus_per_replica",
    "gpus_per_replica": "gpus_per_replica",
    "max_batch_size": "max_batch_size",
    "max_pixels": "max_pixels",
    "max_upload_mb": "max_upload_mb",
    "auth_token_file": "auth_token_file",
    "allowed_hosts": "allowed_hosts",
}
# Serve's proxy settings (http_options) this CLI passes on: a request that takes longer, its upload
# included, is answered 408 and cancelled; an idle keep-alive connection is closed after this.
HTTP_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 300.0, "keep_alive_timeout_s": 5}


def read_config(path: str) -> tuple[dict, dict]:
    """(application args, http_options) of a Serve config file's first application."""
    file = Path(path).expanduser()
    try:
        doc = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise UserError(f"--config: {path} not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not apps or not isinstance(apps[0], dict):
        raise UserError(f"{path}: expected a Ray Serve config with an 'applications' list")
    if apps[0].get("import_path") != "deploy.app:build_app":
        raise UserError(f"{path}: applications[0].import_path: expected deploy.app:build_app")
    args = apps[0].get("args") or {}
    http = doc.get("http_options") or {}
    if not isinstance(args, dict) or not isinstance(http, dict):
        raise UserError(f"{path}: applications[0].args and http_options must be mappings")
    return args, http


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it): for servers the benchmarks
    and tests start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"--port: cannot listen on {host}:{port} ({e.strerror}); pick another port"
            ) from None


def http_options(args: argparse.Namespace, http: dict, source: str) -> dict:
    """Serve's http_options: HTTP_DEFAULTS < the config file's http_options < flags, checked."""
    options = {key: http.get(key, value) for key, value in HTTP_DEFAULTS.items()}
    flags = {"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout}
    options.update({key: value for key, value in flags.items() if value is not None})
    options["host"] = str(options["host"])
    port = options["port"]
    if not isinstance(port, int) or not 0 < port < 65536:
        raise UserError(f"{source}: port: expected a TCP port number, got {port!r}")
    timeout, keep_alive = options["request_timeout_s"], options["keep_alive_timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise UserError(
            f"{source}: request_timeout_s: expected a positive number of seconds, got {timeout!r}"
        )
    if isinstance(keep_alive, bool) or not isinstance(keep_alive, int) or keep_alive < 1:
        raise UserError(
            f"{source}: keep_alive_timeout_s: expected whole seconds, at least 1, got {keep_alive!r}"
        )
    return options


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def start_app(settings, http_options: dict) -> None:
    """Serve's HTTP proxy (http_options: host, port, timeouts) and the application (deploy.app.application)
    at / on the Ray this process is connected to; a UserError when a replica fails to start."""
    from ray import serve

    from deploy.app import application

    serve.start(http_options=http_options)
    try:
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # a replica failed in __init__ (its traceback is in the log above)
        raise UserError(f"the application did not start: {str(e).splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> int:
    from deploy.app import check_models
    from deploy.settings import settings_from

    args = build_parser().parse_args(argv)
    values, http = read_config(args.config) if args.config else ({}, {})
    source = args.config or "flags"
    values = {
        **values,
        **{field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag) is not None},
    }
    if not (values.get("detector") or values.get("classifier") or values.get("library")):
        values["detector"] = DEFAULT_DETECTOR
    settings = settings_from(values, source)
    try:
        models = check_models(settings)
    except UserError as e:
        hint = "; run `make demo` first or pass --detector" if settings.detector == DEFAULT_DETECTOR else ""
        raise UserError(f"{e}{hint}") from None
    options = http_options(args, http, source)
    host, port = options["host"], options["port"]
    if not args.address:  # on a cluster the proxies listen on other machines
        _check_port(host, port)
    if host not in LOOPBACK and not read_token(settings):
        print(
            f"warning: listening on {host} without a token: anyone who can reach port {port} can use the "
            f"models; give --auth-token-file FILE or set {TOKEN_ENV}",
            file=sys.stderr,
            flush=True,
        )

    from ray import serve

    from trainers.ray_seam import init_ray

    init_ray(args.address, str(_cli.REPO))
    # SIGTERM (a service manager, `kill`) stops as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start_app(settings, options)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        for role, (name, version) in models.items():
            print(f"serving {role}: {name} version {version} ({getattr(settings, role)})")
        if settings.library:
            print(f"serving slice library: {settings.library}")
        print(
            f"ready: http://{shown}:{port}  (the page; API docs: http://{shown}:{port}/docs; Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    _cli.run(main)
