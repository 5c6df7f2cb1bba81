"""A temporary MLflow store holding a small trained detector and slice classifier, and a real
`python -m platform.serve` on 127.0.0.1 over them: what the serving and page tests use."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import requests
import torch

from platform.serve import free_port
from tests.classifier_data import TINY, write_volumes
from tests.helpers import REPO, SHARED_DATA, sample_subset

DETECTOR = "nuclei"
CLASSIFIER = "slices"
OPERATING_POINT = 0.65  # the registered detector's score_threshold: among its scores (0.59-0.71 on IMAGES[0])
SHELL = SHARED_DATA / "microct_shell" / "shell_225x128x128.nii.gz"
ADRENAL = sorted((SHARED_DATA / "adrenal3d" / "volumes").glob("*.nii.gz"))
RAW = {"Content-Type": "application/octet-stream"}  # an upload's label: unlabelled ones are 415


def clean_env() -> dict:
    """This process's environment without MLflow variables a test may have left (they would win over
    --tracking-uri in a child)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def train_detector(root: Path, **overrides):
    """A ResNet-18-FPN Mask R-CNN trained for one epoch on 4 sample images at 128-160 px (~30 s on 2 CPUs)."""
    from trainers.config import apply_overrides
    from trainers.detection.train import run_training
    from trainers.ray_seam import LocalSeam
    from trainers.recipes import get_recipe

    data = sample_subset(root / "data", 4)
    values = {"data": str(data), "epochs": 1, "min_size": 128, "max_size": 160, "val_fraction": 0.25}
    cfg = apply_overrides(get_recipe("dsb2018_demo"), {**values, **overrides})
    torch.manual_seed(0)
    checkpoint = root / "detector"
    run_training(cfg, LocalSeam(checkpoint_dir=checkpoint))
    return checkpoint


def train_classifier(root: Path) -> Path:
    """The two-class (ball/box) slice classifier of tests/classifier_data.py, 2 epochs."""
    from trainers.classification.train import run_training
    from trainers.config import apply_overrides
    from trainers.ray_seam import LocalSeam
    from trainers.recipes import get_recipe

    labels = write_volumes(root / "volumes")
    cfg = apply_overrides(get_recipe("adrenal3d_cpu"), {**TINY, "data": str(labels), "epochs": 2}, "test")
    checkpoint = root / "classifier"
    run_training(cfg, LocalSeam(checkpoint))
    return checkpoint


def register_models(root: Path) -> str:
    """A SQLite store under root with DETECTOR and CLASSIFIER registered (alias champion); its URI."""
    from deploy.registry import log_checkpoint, register
    from platform._cli import use_experiment
    from trainers.detection.model import checkpoint_settings
    from trainers.tracking import log_data_inputs

    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = use_experiment(uri, "serve-test")
    # as dsb2018_cpu: grey normalisation (16-bit uploads must reach it unsquashed), masks refined; its
    # operating point given (one epoch on one validation image has nothing to choose it from) and below
    # some of its detections' scores, so that it shows in what the paths report
    detector = train_detector(
        root,
        normalize="grey",
        mask_refine="otsu",
        choose_score_threshold=False,
        score_threshold=OPERATING_POINT,
    )
    models = ((DETECTOR, detector, "segm_AP"), (CLASSIFIER, train_classifier(root), "volume_auc"))
    try:
        for name, checkpoint, metric in models:
            with mlflow.start_run(experiment_id=experiment, run_name=name):
                # as a training run logs them: the validation numbers and, for a detector, the baseline's
                # and the data they were measured on
                mlflow.log_metrics({metric: 0.5, "val_loss": 1.25})
                if name == DETECTOR:
                    mlflow.log_metric("baseline_segm_AP", 0.25)
                    log_data_inputs(checkpoint_settings(checkpoint)[0])
                version = register(log_checkpoint(checkpoint).model_uri, name)
                mlflow.MlflowClient().set_model_version_tag(name, version.version, "metric", metric)
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")
    return uri


def library_folder(root: Path, volumes: list[Path]) -> Path:
    """A folder holding (links to) `volumes`: a slice library as a user would configure one."""
    root.mkdir(parents=True, exist_ok=True)
    for volume in volumes:
        (root / volume.name).symlink_to(volume)
    return root


def served_config(root: Path, **args) -> Path:
    """A copy of deploy/serve.yaml (as a user would edit it) with these application args."""
    import yaml

    doc = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    doc["applications"][0]["args"].update(args)
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump(doc))
    return config


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text()


def start_server(uri: str, *flags: str, log: Path, timeout: float = 240) -> Server:
    """`python -m platform.serve` on a free port; returns once /healthz answers (or raises with its log)."""
    port = free_port()
    out = open(log, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "platform.serve", "--tracking-uri", uri, "--port", str(port), *flags],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"platform.serve exited with {process.returncode}:\n{server.output()[-4000:]}")
        if "ready: http" in server.output():
            try:
                if requests.get(f"{server.url}/healthz", timeout=5).ok:
                    return server
            except requests.ConnectionError:
                pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"platform.serve did not get ready in {timeout} s:\n{server.output()[-4000:]}")
