"""MLflow tracking of training runs: every epoch's metrics logged to the run, with step = epoch."""

import time

from trainers.ray_seam import NODE_KEYS


def mlflow_epoch_callback(tracking_uri: str, run_id: str):
    """A Ray Train callback that logs every epoch's numeric metrics (rank 0's, which include the
    evaluation) to the MLflow run `run_id`, with step = epoch. It runs in Ray Train's controller process,
    so it talks to the tracking server by URI and run id, not through the driver's active run."""
    import mlflow
    from mlflow.entities import Metric, RunTag
    from ray.train import UserCallback

    class MLflowEpochCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            values = metrics[0]
            step = int(values.get("epoch", 0))
            now = int(time.time() * 1000)
            batch = [
                Metric(key, float(value), now, step)
                for key, value in values.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            ]
            # the nodes' tags each epoch: a restarted worker group may run elsewhere
            tags = [RunTag(key, values[key]) for key in NODE_KEYS if key in values]
            mlflow.MlflowClient(tracking_uri).log_batch(run_id, metrics=batch, tags=tags)

    return MLflowEpochCallback()
