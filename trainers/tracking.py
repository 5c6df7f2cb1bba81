"""MLflow tracking of training runs: the one place an epoch's metrics and the Ray node tags reach MLflow (one
log_batch per epoch, step = epoch), for platform.train's Ray Train runs and for a search's Tune trials (one
nested run per trial under the search's parent run); and the data a run trained and was scored on, as
MLflow dataset inputs (the runs table's Dataset column)."""

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunTag
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.train import UserCallback

from trainers.config import ClassifierConfig
from trainers.ray_seam import NODE_KEYS


class RecordsDataset(MetaDataset):
    """The items a run trained or validated on as an MLflow dataset: the folder or file they come from, a
    digest of their ids (two runs on the same items show the same digest), and their counts as the profile."""

    def __init__(self, source: str | Path, name: str, ids: list[str], profile: dict):
        digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:8]
        super().__init__(resolve_dataset_source(str(Path(source).resolve())), name, digest)
        self._profile = profile

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_data_inputs(cfg) -> None:
    """The training and validation items of a config (its data split as training splits it) as dataset
    inputs of the active run, named `<source> (<training|validation>)`."""
    source, splits = _classifier_splits(cfg) if isinstance(cfg, ClassifierConfig) else _detector_splits(cfg)
    for context, (ids, profile) in splits.items():
        name = f"{Path(source).name} ({context})"
        mlflow.log_input(RecordsDataset(source, name, ids, profile), context=context)


def _detector_splits(cfg) -> tuple[str, dict]:
    """Images and instances of each split."""
    from datasets.instances import SAMPLE_DATA
    from trainers.detection.train import config_split

    splits = {}
    for context, records in zip(("training", "validation"), config_split(cfg), strict=True):
        instances = sum(len(r.instances) or len(r.mask_paths) for r in records)
        splits[context] = ([r.image_id for r in records], {"images": len(records), "instances": instances})
    return str(cfg.data or SAMPLE_DATA), splits


def _classifier_splits(cfg) -> tuple[str, dict]:
    """Slices, specimens and slices per class of each split; a classifier's cfg.data is its slice index."""
    from datasets.slices import split_rows

    train, val, _ = split_rows(Path(cfg.data), cfg.val_fraction, cfg.split_seed)
    splits = {}
    for context, rows in (("training", train), ("validation", val)):
        profile = {"slices": len(rows), "specimens": len({r["specimen"] for r in rows})}
        profile.update(sorted(Counter(f"class {r['label']}" for r in rows).items()))
        ids = [f"{r['specimen']}/{Path(r['path']).name}/{r['label']}" for r in rows]
        splits[context] = (ids, profile)
    return cfg.data, splits


def log_epoch(tracking_uri: str, run_id: str, metrics: dict[str, float], values: dict, step: int) -> None:
    """`metrics` at `step` (the epoch) and the node tags found in `values`, in one request. The tags are
    set every epoch: a restarted worker group may run on other nodes."""
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, value in metrics.items()]
    tags = [RunTag(key, values[key]) for key in NODE_KEYS if key in values]
    mlflow.MlflowClient(tracking_uri).log_batch(run_id, metrics=batch, tags=tags)


class EpochLogger(UserCallback):
    """A Ray Train callback that logs every epoch's numeric metrics (rank 0's, which include the evaluation)
    to the MLflow run `run_id`. It runs in Ray Train's controller process, so it talks to the tracking
    server by URI and run id, not through the driver's active run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context, metrics, checkpoint):
        values = metrics[0]
        numbers = {
            key: float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        log_epoch(self.tracking_uri, self.run_id, numbers, values, int(values.get("epoch", 0)))


class TrialLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow callback (a nested run per trial, its config as params) made resumable: a trial
    restarted by a resumed search logs into the nested run it already had (found by its parent and trial
    name) instead of opening a second one, and metrics are logged at step = epoch, which a restarted trial
    continues (Tune's own iteration count restarts)."""

    def __init__(self, *args, parent_run_id: str, experiment_id: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)
        # Ray's set-up prefers an inherited MLFLOW_EXPERIMENT_ID over experiment_name: trials would land in
        # whatever experiment the shell had set. They belong beside their parent run.
        self.mlflow_util.experiment_id = self.experiment_id

    def log_trial_start(self, trial):
        if trial not in self._trial_runs:
            client = mlflow.MlflowClient(self.tracking_uri)
            runs = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=(
                    f"tags.mlflow.parentRunId = '{self.parent_run_id}' AND tags.trial_name = '{trial}'"
                ),
            )
            if runs:  # its params are logged (a restored config would re-log tuples as lists: refused)
                self._trial_runs[trial] = runs[0].info.run_id
                client.update_run(runs[0].info.run_id, status="RUNNING")
                return
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial, result: dict):
        step = int(result.get("epoch") or iteration)
        log_epoch(self.tracking_uri, self._trial_runs[trial], _tune_numbers(result), result, step)


def _tune_numbers(result: dict, prefix: str = "") -> dict[str, float]:
    """A Tune result's metrics as Ray's MLflow callback logs them: nested dicts (the trial's config) under
    "outer/inner" keys, and every value float() takes (Tune's bools too)."""
    numbers = {}
    for key, value in result.items():
        if isinstance(value, dict):
            numbers.update(_tune_numbers(value, f"{prefix}{key}/"))
            continue
        try:
            numbers[f"{prefix}{key}"] = float(value)
        except (TypeError, ValueError):
            pass  # strings such as the node ids (kept as tags), None before a checkpoint
    return numbers
