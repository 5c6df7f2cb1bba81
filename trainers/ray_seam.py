"""The one seam to Ray: worker context, DDP preparation, metric/checkpoint reporting.

Ray's reporting API changes between releases (session.report -> train.report; Train V2 inside Tune), so
the training loop only talks to a `Seam`. `RaySeam` is used on Ray Train workers; `LocalSeam` runs the
same loop in a plain process (the benchmark's baseline, quick tests).
"""

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

CHECKPOINT_PATH_KEY = "checkpoint_path"  # where Tune's results carry the reported checkpoint (Train V2)
# Left out when the checkout is shipped to a cluster (init_ray, platform.launch); Ray also leaves out what
# .gitignore lists (caches, local stores).
WORKING_DIR_EXCLUDES = [".venv", ".git", ".mlflow", ".ray_results", "**/__pycache__"]
# Set by Ray's job manager in the environment of a job's driver (`ray job submit`, platform.launch, a
# KubeRay RayJob), beside RAY_ADDRESS: the job's runtime_env, which already holds the working_dir.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RaySeam:
    def __init__(self):
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._torch.prepare_model(model)  # moves to the device, wraps in DDP when world_size > 1

    def prepare_loader(self, loader):
        return self._torch.prepare_data_loader(loader)  # DistributedSampler + device moves

    def share(self, value):
        """Rank 0's `value` on every rank (a decision only rank 0 can make, such as early stopping)."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        return Path(checkpoint.path) if checkpoint is not None else None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None] | None) -> None:
        """All ranks must call this once per epoch (it is a barrier); rank 0 passes `write_checkpoint`."""
        if write_checkpoint is None:
            self._train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp))
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(tmp))


class LocalSeam:
    """A single process with no Ray: rank 0 of 1; checkpoints go to `checkpoint_dir` if given."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: Path | None = None, on_report: Callable[[dict], None] | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.checkpoint_dir = checkpoint_dir
        self.on_report = on_report
        self.reports: list[dict] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def share(self, value):
        return value

    def latest_checkpoint(self) -> Path | None:
        if self.checkpoint_dir and (self.checkpoint_dir / "model.pt").exists():
            return self.checkpoint_dir
        return None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None] | None) -> None:
        if write_checkpoint is not None and self.checkpoint_dir is not None:
            # Written beside, then swapped in: a crash never leaves half a checkpoint.
            tmp = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_checkpoint(tmp)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            tmp.rename(self.checkpoint_dir)
        self.reports.append(metrics)
        if self.on_report:
            self.on_report(metrics)


def init_ray(address: str | None, repo: str) -> None:
    """Start a local Ray, or join the cluster at `address` shipping this checkout as the working_dir
    (workers import trainers/ and datasets/ from it); a Ray job's driver (platform.launch) joins its job's
    cluster with the job's runtime_env. The dashboard stays on: Train's placement-group
    clean-up queries actor state through it, and without it a finished trial's resources were never freed."""
    import logging
    import os

    import ray

    if ray.is_initialized():
        return
    # Ray starts workers at nice 15 so its own services stay responsive; on a small machine those services
    # then take the workers' CPU time: `platform.bench train` measured Ray/plain 0.854 at nice 15 and 1.02
    # at nice 0 on 2 cores. The training workers are the point of the machine, so run them at normal
    # priority (as Ray's own job manager does for job drivers). Read when the local Ray starts.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if os.environ.get(RAY_JOB_ENV):
        # A job's driver runs on the job's cluster whatever `address` says ("auto" reads the RAY_ADDRESS the
        # job manager set; it never starts a Ray of its own) and keeps the job's runtime_env: Ray refuses a
        # second working_dir ("Failed to merge the Job's runtime env").
        ray.init(address="auto")
    elif address:
        ray.init(address=address, runtime_env={"working_dir": repo, "excludes": WORKING_DIR_EXCLUDES})
    else:
        from ray._private.services import find_gcs_addresses

        others = find_gcs_addresses()
        if others:
            # Measured: with two local Ray instances on one machine, Ray Train's placement-group cleaner
            # cannot tell which to query ("Found multiple active Ray instances") and a stopped trial's
            # CPUs are never freed, so the next trial waits forever. Sharing one Ray avoids it.
            logging.getLogger(__name__).warning(
                "another Ray is running on this machine (%s): two local Rays can leave a stopped trial's "
                "CPUs reserved; run one search at a time, or `ray start --head` once and pass --address",
                ", ".join(sorted(others)),
            )
        ray.init(configure_logging=True, logging_level=logging.WARNING)
