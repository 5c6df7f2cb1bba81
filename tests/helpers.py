import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "datasets" / "sample" / "dsb2018"


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 900, env: dict | None = None):
    """Run `python -m ...` the way a user does, from the repo root, and capture everything."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def sample_subset(dest: Path, n: int) -> Path:
    """The first `n` images of the bundled DSB2018 sample copied into `dest` (a small dataset to train on)."""
    for folder in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:n]:
        shutil.copytree(folder, dest / folder.name)
    return dest


@contextlib.contextmanager
def mlflow_uris_restored():
    """MLflow keeps its URIs in globals and in the environment (which subprocesses of later tests inherit):
    put both back afterwards."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        mlflow.set_registry_uri("")  # "" = follow the tracking URI again
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
