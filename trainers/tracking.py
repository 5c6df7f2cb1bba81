"""MLflow tracking of training runs: the one place an epoch's metrics and the Ray node tags reach MLflow (one
log_batch per epoch, step = epoch), for platform.train's Ray Train runs and for a search's Tune trials (one
nested run per trial under the search's parent run); and the data a run trained and was scored on, as
MLflow dataset inputs (the runs table's Dataset column)."""

import hashlib
import json
import time
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunTag
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.train import UserCallback

from trainers.ray_seam import NODE_KEYS


class RecordsDataset(MetaDataset):
    """Image records as an MLflow dataset: the folder or file they come from, a digest of their image ids
    (two runs on the same images show the same digest), and their counts as the profile."""

    def __init__(self, source: str | Path, name: str, records: list):
        ids = "\n".join(sorted(r.image_id for r in records))
        digest = hashlib.sha256(ids.encode()).hexdigest()[:8]
        super().__init__(resolve_dataset_source(str(Path(source).resolve())), name, digest)
        instances = sum(len(r.instances) or len(r.mask_paths) for r in records)
        self._profile = {"images": len(records), "instances": instances}

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_data_inputs(source: str | Path, splits: dict[str, list]) -> None:
    """Each split's records (context -> records, e.g. training, validation) as a dataset input of the active
    run, named `<folder> (<context>)`."""
    for context, records in splits.items():
        name = f"{Path(source).name} ({context})"
        mlflow.log_input(RecordsDataset(source, name, records), context=context)


def log_detector_data(cfg) -> None:
    """A detector config's training and validation images (its data split as training splits it) as dataset
    inputs of the active run."""
    from datasets.instances import SAMPLE_DATA
    from trainers.detection.train import config_split

    train, val = config_split(cfg)
    log_data_inputs(cfg.data or SAMPLE_DATA, {"training": train, "validation": val})


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
