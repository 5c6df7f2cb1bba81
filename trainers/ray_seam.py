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

from trainers.checkpoints import finished_checkpoint, swap_in

CHECKPOINT_PATH_KEY = "checkpoint_path"  # where Tune's results carry the reported checkpoint (Train V2)
# Left out when the checkout is shipped to a cluster (init_ray, platform.launch); Ray also leaves out what
# .gitignore lists (caches, local stores).
WORKING_DIR_EXCLUDES = [".venv", ".git", ".mlflow", ".ray_results", "**/__pycache__"]
# Set by Ray's job manager in the environment of a job's driver (`ray job submit`, platform.launch, a
# KubeRay RayJob), beside RAY_ADDRESS: the job's runtime_env, which already holds the working_dir.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Reported with every epoch and kept as MLflow tags: the Ray nodes (ids as `ray list nodes` shows them, and
# their IPs) the run's Train workers ran on, so a user can tell where a trial ran or was moved to.
NODE_KEYS = ("ray_nodes", "ray_node_ips")


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
        self._download = None  # the temporary folder a checkpoint from object storage is downloaded to
        here = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
        nodes = [here]
        if self.world_size > 1:  # Ray Train has set up the process group before the loop starts
            nodes = [None] * self.world_size
            torch.distributed.all_gather_object(nodes, here)
        self.nodes = {key: ",".join(sorted({n[i] for n in nodes})) for i, key in enumerate(NODE_KEYS)}

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
        if checkpoint is None:
            return None
        self._download = tempfile.TemporaryDirectory()  # removed with the seam
        return checkpoint_folder(checkpoint, Path(self._download.name))

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None] | None) -> None:
        """All ranks must call this once per epoch (it is a barrier); rank 0 passes `write_checkpoint`."""
        metrics = {**metrics, **self.nodes}
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

    def __init__(
        self,
        checkpoint_dir: Path | None = None,
        on_report: Callable[[dict], None] | None = None,
        device: str | None = None,
    ):
        # default: the GPU when there is one; a benchmark names the device it measures (`bench gpu`)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        return finished_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None

    def report(self, metrics: dict, write_checkpoint: Callable[[Path], None] | None) -> None:
        if write_checkpoint is not None and self.checkpoint_dir is not None:
            # Written beside, then swapped in: a crash never leaves half a checkpoint, nor none.
            tmp = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_checkpoint(tmp)
            swap_in(tmp, self.checkpoint_dir)
        self.reports.append(metrics)
        if self.on_report:
            self.on_report(metrics)


def report_trial(metrics: dict) -> None:
    """Report a Tune function trial's result that no Ray Train run produced (a thresholds trial)."""
    import ray.tune

    ray.tune.report(metrics)


def storage_filesystem(storage_path: str):
    """The pyarrow filesystem and path of a storage path: a local (or mounted shared) folder, or a URI
    such as s3://bucket/prefix (an S3-compatible store's endpoint comes from AWS_ENDPOINT_URL, or from
    `?endpoint_override=host:port&scheme=http` after the URI), gs://..., the way Ray reads it."""
    import pyarrow.fs

    if "://" not in storage_path:
        return pyarrow.fs.LocalFileSystem(), storage_path
    return pyarrow.fs.FileSystem.from_uri(storage_path)


def experiment_path(storage_path: str, name: str) -> str:
    """Where Ray keeps the run or search `name` under `storage_path` (a URI's query stays at its end)."""
    base, sep, query = storage_path.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def checkpoint_at(storage_path: str, path: str):
    """The Ray checkpoint at `path` of the storage (Tune's results carry only the path of a trial's)."""
    from ray.train import Checkpoint

    return Checkpoint(path, filesystem=storage_filesystem(storage_path)[0])


def checkpoint_folder(checkpoint, tmp: Path) -> Path:
    """A Ray checkpoint as a folder on this machine: where it is on a local or mounted shared filesystem,
    else downloaded from object storage into `tmp`."""
    if checkpoint.filesystem.type_name == "local":
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(str(tmp / "checkpoint")))


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
