"""Driver side of a search: Ray Tune (Optuna TPE searcher, ASHA scheduler) over Ray Train trials, one MLflow
parent run with a nested run per trial, and the best trial's model registered as `champion`."""

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import ray
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from datasets.errors import UserError
from deploy.registry import log_checkpoint, register
from trainers.config import to_dict
from trainers.loop import tune_trial
from trainers.ray_seam import CHECKPOINT_PATH_KEY, init_ray
from trainers.tasks import task_of

log = logging.getLogger(__name__)
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for each trial's driver function
TRIAL_MAX_FAILURES = 2  # a trial whose worker dies restarts from its last checkpoint (as platform.train)


@dataclass
class SearchSettings:
    space_name: str
    num_samples: int
    metric: str
    mode: str
    grace_period: int
    reduction_factor: float
    workers_per_trial: int
    gpus_per_trial: float
    cpus_per_worker: float | None
    concurrent_trials: int
    seed: int
    experiment: str
    model_name: str
    tracking_uri: str
    storage_path: str
    address: str | None = None
    repo: str | None = None  # shipped to workers as working_dir when running on a cluster


@dataclass
class SearchSummary:
    table: str
    rows: list[dict]
    best_trial: str
    best_value: float
    registered: object  # mlflow ModelVersion
    parent_run_id: str


def _resources(settings: SearchSettings) -> dict:
    workers = settings.workers_per_trial
    use_gpu = settings.gpus_per_trial > 0
    cpus = settings.cpus_per_worker
    if cpus is None:  # share the machine's CPUs between the concurrently running workers
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // (workers * settings.concurrent_trials))
    return dict(
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=float(cpus),
        gpus_per_worker=settings.gpus_per_trial / workers if use_gpu else 0.0,
    )


def run_search(cfg, space: dict, settings: SearchSettings) -> SearchSummary:
    """Search `space` around the base config `cfg` (a MaskRCNNConfig or a ClassifierConfig)."""
    init_ray(settings.address, settings.repo)
    experiment_id = mlflow.get_experiment_by_name(settings.experiment).experiment_id
    run_name = f"{settings.space_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Every config field is in the param space (constants pass through), so each trial's config, and so
    # its MLflow params, is the whole config.
    param_space = {**to_dict(cfg), **space}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as parent:
        mlflow.log_params({f"search.{k}": v for k, v in vars(settings).items() if k not in ("repo",)})
        mlflow.log_dict(to_dict(cfg), "base_config.json")
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=settings.seed))
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.epochs,
            grace_period=min(settings.grace_period, cfg.epochs),
            reduction_factor=settings.reduction_factor,
        )
        trainable = tune.with_parameters(
            tune_trial,
            storage_path=settings.storage_path,
            max_failures=TRIAL_MAX_FAILURES,
            **_resources(settings),
        )
        tuner = tune.Tuner(
            # The trial itself only waits on its Train workers, which hold the CPUs/GPUs; Ray needs some
            # non-zero request, so it asks for a little memory instead of a CPU a worker could use.
            tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=settings.num_samples,
                max_concurrent_trials=settings.concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=settings.storage_path,
                verbose=1,
                callbacks=[
                    MLflowLoggerCallback(
                        tracking_uri=settings.tracking_uri,
                        experiment_name=settings.experiment,
                        tags={"mlflow.parentRunId": parent.info.run_id, "search": run_name},
                    )
                ],
            ),
        )
        results = tuner.fit()
        rows = _rows(results, space, cfg.epochs, settings.metric, task_of(cfg).headline)
        table = format_table(rows, list(space), settings.metric, settings.mode)
        mlflow.log_text(table, "trials.txt")
        mlflow.log_text(_csv(rows), "trials.csv")
        _log_curves(results, settings.metric)
        best = _best(results, settings)
        best_run = _trial_run_id(experiment_id, parent.info.run_id, best.metrics["trial_id"])
        checkpoint = Path(best.metrics[CHECKPOINT_PATH_KEY])
        with mlflow.start_run(run_id=best_run, nested=True):
            info = log_checkpoint(checkpoint)
        version = register(info.model_uri, settings.model_name)
        mlflow.log_params(
            {
                "best_trial": best.metrics["trial_id"],
                "registered_model": settings.model_name,
                "registered_version": version.version,
            }
        )
        mlflow.log_metric(f"best_{settings.metric}", best.metrics[settings.metric])
    return SearchSummary(
        table, rows, best.metrics["trial_id"], best.metrics[settings.metric], version, parent.info.run_id
    )


def _best(results, settings: SearchSettings):
    ok = [r for r in results if r.error is None and r.metrics and CHECKPOINT_PATH_KEY in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error).splitlines()[0] for r in results if r.error is not None)[:2000]
        raise UserError(f"no trial finished an epoch, nothing to register ({errors or 'no results'})")
    sign = 1 if settings.mode == "max" else -1
    return max(ok, key=lambda r: sign * r.metrics.get(settings.metric, float("-inf") * sign))


def _trial_run_id(experiment_id: str, parent_id: str, trial_id: str) -> str:
    runs = mlflow.search_runs(
        [experiment_id],
        output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' AND tags.trial_name LIKE '%{trial_id}'",
    )
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run for trial {trial_id}, found {len(runs)}")
    return runs[0].info.run_id


def _rows(results, space: dict, max_epochs: int, metric: str, headline: tuple[str, ...]) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        epochs = int(m.get("training_iteration", 0))
        if r.error is not None:
            status = "ERROR"
        elif epochs >= max_epochs:
            status = "completed"
        elif m.get("early_stopped"):
            status = f"early stop@{epochs}"
        else:
            status = f"stopped@{epochs} (ASHA)"
        row = {"trial": m.get("trial_id", "?"), **{k: r.config.get(k) for k in space}, "epochs": epochs}
        row.update({k: m.get(k) for k in dict.fromkeys((*headline[1:], metric))})
        row["status"] = status
        rows.append(row)
    return rows


def format_table(rows: list[dict], params: list[str], metric: str, mode: str) -> str:
    """Trials sorted best first; floats to 3 decimals."""
    sign = -1 if mode == "max" else 1

    def key(row):
        value = row.get(metric)
        return (value is None, sign * (value or 0.0))

    rows = sorted(rows, key=key)
    columns = list(rows[0]) if rows else ["trial", *params]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def _log_curves(results, metric: str) -> None:
    """Per-trial learning curves (metric and training loss per epoch) as an MLflow figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        df = r.metrics_dataframe
        if df is None or df.empty or metric not in df:
            continue
        label = r.metrics.get("trial_id", "?")
        axes[0].plot(df["training_iteration"], df[metric], marker="o", label=label)
        if "train_loss" in df:
            axes[1].plot(df["training_iteration"], df["train_loss"], marker="o", label=label)
    axes[0].set(xlabel="epoch", ylabel=metric, title=f"validation {metric} per trial")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss per trial")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    mlflow.log_figure(fig, "learning_curves.png")
    plt.close(fig)
