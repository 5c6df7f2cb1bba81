"""What differs between the two kinds of training (instance segmentation, slice classification), picked by
the config's type: the Ray Train loop, the metric a search optimises, the headline numbers; and the Ray
Train TorchTrainer that runs a config's loop (one run of platform.train, one trial of a search)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainers.classification import train as classification_train
from trainers.config import ClassifierConfig, config_class
from trainers.detection import train as detection_train


@dataclass(frozen=True)
class Task:
    name: str
    loop: Callable[[dict], None]  # Ray Train's per-worker entry point
    metric: str  # what a search maximises by default
    headline: tuple[str, ...]  # printed at the end of a run, shown in a search's table
    curves: tuple[str, ...]  # validation metrics drawn beside the loss curves


def task_of(config: Any) -> Task:
    """The task of a config object or a config dict (a trial's)."""
    cls = config_class(config) if isinstance(config, dict) else type(config)
    if cls is ClassifierConfig:
        return Task(
            "classification",
            classification_train.train_loop_per_worker,
            "volume_auc",
            ("train_loss", "val_loss", "slice_acc", "volume_acc", "volume_auc"),
            ("val_loss", "slice_acc", "volume_acc", "volume_auc", "volume_f1"),
        )
    return Task(
        "segmentation",
        detection_train.train_loop_per_worker,
        "segm_AP",
        ("train_loss", "bbox_AP", "segm_AP", "best_segm_AP"),
        ("bbox_AP", "segm_AP", "segm_AP50", "kaggle_mAP"),
    )


def make_trainer(
    config: dict,
    *,
    name: str,
    storage_path: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    callbacks=(),
    checkpoints_to_keep: int | None = 1,
    max_failures: int = 0,
):
    """A Ray Train TorchTrainer of `num_workers` DDP workers (gloo on CPU, NCCL on GPU) running the loop of
    the config's task (Mask R-CNN or slice classifier, trainers/tasks.py).

    Train V2 keeps a run's per-epoch metrics with its checkpoints: keep them all (None) to read every
    epoch from `Result.metrics_dataframe`. When a worker process dies, Ray restarts the whole group up to
    `max_failures` times and the loop resumes from the latest checkpoint (at most one epoch is lost). A new
    trainer with the same `name` and `storage_path` continues a stopped run the same way (`--resume`).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        task_of(config).loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def tune_trial(config: dict, **trainer_kwargs) -> None:
    """One Tune trial = one Ray Train run (Train V2 inside Tune); its reports reach Tune via the callback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    name = ray.tune.get_context().get_trial_name()
    make_trainer(config, name=name, callbacks=[TuneReportCallback()], **trainer_kwargs).fit()
