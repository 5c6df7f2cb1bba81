"""What differs between the two kinds of training (instance segmentation, slice classification), picked by
the config's type: the Ray Train loop, the metric a search optimises, the headline numbers."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainers.config import ClassifierConfig, config_class


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
        from trainers.classifier_loop import train_loop_per_worker

        return Task(
            "classification",
            train_loop_per_worker,
            "volume_auc",
            ("train_loss", "val_loss", "slice_acc", "volume_acc", "volume_auc"),
            ("val_loss", "slice_acc", "volume_acc", "volume_auc", "volume_f1"),
        )
    from trainers.loop import train_loop_per_worker

    return Task(
        "segmentation",
        train_loop_per_worker,
        "segm_AP",
        ("train_loss", "bbox_AP", "segm_AP"),
        ("bbox_AP", "segm_AP", "segm_AP50", "kaggle_mAP"),
    )
