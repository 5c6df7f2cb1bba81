"""Driver side of a search: Ray Tune over trials (Ray Train runs, or evaluations of cached predictions for a
`thresholds` space), an Optuna searcher (TPE, random) or a grid, ASHA or FIFO scheduling, one MLflow parent
run with a nested run per trial, and at the end the trial table, plots and best recipe (report.py) and a
SearchSummary with what registering the best model needs; the caller registers it (platform.tune).

A search is resumable: its settings are an artifact of the parent run, Tune's experiment state is in the
storage path, and `resume_search` picks both up after the driver died (trainers of unfinished trials
continue from their last epoch checkpoint)."""

import json
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from datasets.errors import UserError
from search_spaces import Space, get_space, optuna_space
from trainers.config import MaskRCNNConfig, apply_overrides, config_class, from_dict, to_dict
from trainers.console import say
from trainers.detection.baseline import baseline_metrics
from trainers.detection.combine import is_ensemble_folder
from trainers.detection.model import checkpoint_settings
from trainers.detection.postprocess import POSTPROCESS_FIELDS
from trainers.detection.thresholds import cache_predictions, evaluate_thresholds, load_cache
from trainers.detection.train import config_split
from trainers.ray_seam import CHECKPOINT_PATH_KEY, checkpoint_at, checkpoint_folder, experiment_path, init_ray
from trainers.search.progress import TrialLines
from trainers.search.report import log_trials, write_recipe
from trainers.search.settings import SearchSettings, SearchSummary, grid, searched
from trainers.search.trials import cached_predictions, config_fields, search_trial, thresholds_trial
from trainers.tracking import TrialLogger, log_data_inputs

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for each trial's driver function
TRIAL_MAX_FAILURES = 2  # a trial whose worker dies restarts from its last checkpoint (as platform.train)
STATE_ARTIFACT = "search_state.json"


def run_search(cfg, space: Space, settings: SearchSettings) -> SearchSummary:
    """Search `space` around the base config `cfg` (a MaskRCNNConfig or a ClassifierConfig); `settings`
    passed check_settings, and for a predictions space its model_folder is resolved."""
    init_ray(settings.address, settings.repo)
    settings.name = settings.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_id = mlflow.get_experiment_by_name(settings.experiment).experiment_id
    categories, cache = (), ""
    with mlflow.start_run(experiment_id=experiment_id, run_name=settings.name) as parent:
        mlflow.set_tags({"search": settings.name, "search_role": "parent", "space": space.name})
        if space.on_predictions:
            cfg, categories, cache = _prepare_predictions(settings)
        state = {
            "settings": asdict(settings),
            "config": to_dict(cfg),
            "categories": list(categories),
            "cache": cache,
        }
        mlflow.log_dict(state, STATE_ARTIFACT)  # what --resume needs to rebuild this search
        mlflow.log_params(
            {f"search.{k}": v for k, v in asdict(settings).items() if k not in ("repo", "recipe_out")}
        )
        mlflow.log_dict(to_dict(cfg), "base_config.json")
        param_space = _param_space(cfg, space, settings)
        lines = TrialLines(_trial_count(param_space, settings), cfg.epochs, settings.metric, settings.mode)
        tuner = tune.Tuner(
            _trainable(space, settings, cache),
            param_space=param_space,
            tune_config=_tune_config(cfg, space, settings, categories),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=settings.storage_path,
                verbose=1,
                callbacks=[_mlflow_callback(settings, parent), lines],
                # A trial whose own process is lost with its node is started again (its Train run then
                # continues from its last checkpoint); a failure inside training is retried by Train.
                failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
            ),
        )
        say(f"search {settings.name} (after an interruption: --resume {settings.name})")
        return _finish(tuner.fit(), cfg, space, settings, parent.info.run_id, categories, cache)


def resume_search(name: str, tracking_uri: str, address: str | None, repo: str | None) -> SearchSummary:
    """Continue search `name` (or the latest one: "latest") after its driver stopped: finished trials keep
    their results, unfinished ones continue from their last checkpoint, trials never started are started."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    parent = _find_parent(name)
    state_path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=STATE_ARTIFACT)
    state = json.loads(Path(state_path).read_text())
    settings = SearchSettings(**{**state["settings"], "address": address, "repo": repo})
    settings.metrics, settings.modes = tuple(settings.metrics), tuple(settings.modes)
    space = get_space(settings.space_name)
    cfg = from_dict(config_class(state["config"]), state["config"], "search state")
    path = experiment_path(settings.storage_path, settings.name)
    if not tune.Tuner.can_restore(path):
        raise UserError(f"--resume {name}: no Tune experiment state at {path} (moved or deleted?)")
    init_ray(address, repo)
    tuner = tune.Tuner.restore(
        path, trainable=_trainable(space, settings, state["cache"]), resume_unfinished=True
    )
    client = mlflow.MlflowClient()
    client.update_run(parent.info.run_id, status="RUNNING")
    with mlflow.start_run(run_id=parent.info.run_id):
        say(f"resuming search {settings.name} (MLflow parent run {parent.info.run_id})")
        results = tuner.fit()
        return _finish(
            results, cfg, space, settings, parent.info.run_id, tuple(state["categories"]), state["cache"]
        )


def _find_parent(name: str):
    where = "tags.search_role = 'parent'" + ("" if name == "latest" else f" AND tags.search = '{name}'")
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=where,
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        what = "no search" if name == "latest" else f"no search named '{name}'"
        raise UserError(f"--resume: {what} in the MLflow store {mlflow.get_tracking_uri()}")
    return runs[0]


def _trial_count(param_space: dict, settings: SearchSettings) -> int:
    """How many trials the search runs: the grid's size, else num_samples."""
    if settings.searcher != "grid":
        return settings.num_samples
    grids = [v["grid_search"] for v in param_space.values() if isinstance(v, dict) and "grid_search" in v]
    return int(np.prod([len(values) for values in grids]))


def _param_space(cfg, space: Space, settings: SearchSettings) -> dict:
    """The trial configs' constants (every config field, so each trial's MLflow params are its whole
    config); for a grid, also the grid. Searched keys are left to the searcher."""
    constants = to_dict(cfg)
    keys = searched(space, settings)
    if keys is None:  # define-by-run: the searcher suggests, its captured names override constants
        return constants
    constants = {k: v for k, v in constants.items() if k not in keys}
    if settings.searcher == "grid":
        return {**constants, **grid(keys, settings.grid_points)}
    return constants


def _searcher_space(space: Space, settings: SearchSettings, cfg, categories):
    """What OptunaSearch searches: the dict less the fixed keys, or the define-by-run function with the
    fixed keys' command-line values put back over whatever it suggested."""
    if not space.define_by_run:
        return searched(space, settings)
    fn = optuna_space(space, tuple(categories))
    fixed = _as_params({k: getattr(cfg, k) for k in settings.fixed if hasattr(cfg, k)})
    return partial(_with_fixed, fn=fn, fixed=fixed) if fixed else fn


def _with_fixed(trial, fn, fixed: dict) -> dict | None:
    # A module-level function (under functools.partial): Tune pickles the searcher, and with it this space.
    return {**(fn(trial) or {}), **fixed} or None


def _as_params(values: dict) -> dict:
    # Tuple fields travel as "a,b,c" strings, as the spaces sample them.
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in values.items()}


def _tune_config(cfg, space: Space, settings: SearchSettings, categories) -> tune.TuneConfig:
    seed = settings.seed
    if settings.searcher == "grid":
        searcher = None  # Tune's own variant generator walks the grid
        num_samples = 1
    else:
        sampler = (
            optuna.samplers.TPESampler(seed=seed, multivariate=True, group=space.define_by_run)
            if settings.searcher == "tpe"
            else optuna.samplers.RandomSampler(seed=seed)
        )
        many = settings.multi_objective
        searcher = OptunaSearch(
            space=_searcher_space(space, settings, cfg, categories),
            metric=list(settings.metrics) if many else settings.metric,
            mode=list(settings.modes) if many else settings.mode,
            sampler=sampler,
        )
        num_samples = settings.num_samples
    if space.on_predictions or settings.multi_objective or settings.scheduler == "fifo":
        # One evaluation per thresholds trial: nothing to stop early. ASHA ranks on one metric only.
        scheduler = FIFOScheduler()
    else:
        scheduler = ASHAScheduler(
            time_attr="epoch",  # reported by both loops; unlike Tune's iteration count it survives a resume
            max_t=cfg.epochs,
            grace_period=min(grace_period(settings, cfg.epochs), cfg.epochs),
            reduction_factor=settings.reduction_factor,
        )
    many = settings.multi_objective
    return tune.TuneConfig(
        metric=None if many else settings.metric,
        mode=None if many else settings.mode,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=settings.concurrent_trials,
        reuse_actors=space.on_predictions,  # a thresholds trial is seconds: keep the process and its cache
    )


def _resources(settings: SearchSettings) -> dict:
    workers = settings.workers_per_trial
    use_gpu = settings.gpus_per_trial > 0
    cpus = settings.cpus_per_worker
    if cpus is None:  # share the cluster's CPUs between the concurrently running workers
        total = int(ray.cluster_resources().get("CPU", 1))
        # ... but a worker runs on one node: never ask for more than the largest node has
        largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
        cpus = max(1, min(total // (workers * settings.concurrent_trials), largest))
    return dict(
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=float(cpus),
        gpus_per_worker=settings.gpus_per_trial / workers if use_gpu else 0.0,
    )


def _trainable(space: Space, settings: SearchSettings, cache: str):
    if space.on_predictions:
        return tune.with_resources(tune.with_parameters(thresholds_trial, cache=cache), {"cpu": 1})
    trainable = tune.with_parameters(
        search_trial,
        storage_path=settings.storage_path,
        max_failures=TRIAL_MAX_FAILURES,
        **_resources(settings),
    )
    # The trial itself only waits on its Train workers, which hold the CPUs/GPUs; Ray needs some non-zero
    # request, so it asks for a little memory instead of a CPU a worker could use.
    return tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})


def _prepare_predictions(settings: SearchSettings):
    """The model's config and categories, and its validation predictions cached once for all trials."""
    folder = Path(settings.model_folder)
    if is_ensemble_folder(folder):  # its cache takes one Mask R-CNN apart (inference.detect_candidates)
        raise UserError(f"--model {settings.model}: --space thresholds needs one Mask R-CNN, not an ensemble")
    if not (folder / "categories.json").is_file():
        raise UserError(f"--model {settings.model}: --space thresholds needs a Mask R-CNN, not a classifier")
    cfg, categories = checkpoint_settings(folder)
    cfg = apply_overrides(cfg, settings.overrides)
    categories = tuple(c["name"] for c in categories)
    if "://" in settings.storage_path:
        raise UserError("--space thresholds: needs a local --storage-path for its predictions cache")
    out = Path(settings.storage_path) / settings.name / "predictions.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"caching validation predictions of {settings.model} ...")
    started = time.perf_counter()
    cache_predictions(folder, out)
    load_cache(out)  # fails here, on the driver, if the cache is unreadable
    say(f"cached in {time.perf_counter() - started:.1f} s: {out}")
    mlflow.log_param("search.model_folder", str(folder))
    return cfg, categories, str(out)


def _mlflow_callback(settings: SearchSettings, parent) -> TrialLogger:
    return TrialLogger(
        tracking_uri=settings.tracking_uri,
        experiment_name=settings.experiment,
        tags={"mlflow.parentRunId": parent.info.run_id, "search": settings.name},
        parent_run_id=parent.info.run_id,
        experiment_id=parent.info.experiment_id,
    )


# ---- the end of a search: table, recipe, plots, and what registering the best model needs ---------------


def _finish(results, cfg, space: Space, settings: SearchSettings, parent_id: str, categories, cache: str):
    log_data_inputs(cfg)  # the parent run's Dataset column: what every trial trained and validated on
    classical = _classical_baseline(cfg)
    table, rows, pareto = log_trials(results, cfg, space, settings, categories, classical)
    best = _best(results, settings)
    fields = config_fields(best.config)
    best_cfg = from_dict(config_class(fields), fields, "best trial")
    recipe_path = write_recipe(best_cfg, settings)
    mlflow.log_artifact(str(recipe_path))
    trial_id, value = best.metrics["trial_id"], best.metrics[settings.metric]
    mlflow.log_param("best_trial", trial_id)
    mlflow.log_metric(f"best_{settings.metric}", value)
    predictions = space.on_predictions
    return SearchSummary(
        table=table,
        rows=rows,
        best_trial=trial_id,
        best_value=value,
        best_config=best_cfg,
        best_run_id=_trial_run_id(parent_id, trial_id),
        best_checkpoint="" if predictions else best.metrics[CHECKPOINT_PATH_KEY],
        baseline=_baseline_on_cache(cache, settings) if predictions else None,
        parent_run_id=parent_id,
        recipe_path=recipe_path,
        settings=settings,
        pareto=pareto,
        classical=classical,
    )


def _classical_baseline(cfg) -> tuple[str, dict] | None:
    """A detector search's classical baseline (cfg.baseline) on the base config's validation images, the
    images its trials validate on, logged to the active (parent) run as baseline_<metric>: a row of the
    trial table, never a trial, so never registered. None for a classifier search or baseline=off."""
    if not isinstance(cfg, MaskRCNNConfig) or cfg.baseline == "off":
        return None
    _, val = config_split(cfg)
    metrics = baseline_metrics(val, cfg.baseline, cfg.box_detections_per_img)
    mlflow.log_metrics({f"baseline_{k}": v for k, v in metrics.items()})
    mlflow.log_param("baseline", cfg.baseline)
    return cfg.baseline, metrics


def best_checkpoint(summary: SearchSummary, tmp: Path) -> Path:
    """The best trial's model as a local checkpoint folder, made or downloaded into `tmp` when needed: its
    trained checkpoint, or for a predictions space the searched model with the best thresholds."""
    settings = summary.settings
    if summary.best_checkpoint:
        return checkpoint_folder(checkpoint_at(settings.storage_path, summary.best_checkpoint), tmp)
    out = tmp / "checkpoint"
    shutil.copytree(settings.model_folder, out)
    (out / "config.json").write_text(json.dumps(to_dict(summary.best_config), indent=2) + "\n")
    return out


def _baseline_on_cache(cache: str, settings: SearchSettings) -> tuple[str, float]:
    """The searched model with its own thresholds, scored on the same cached predictions: the number a
    registered version must beat when that model is the champion."""
    data = cached_predictions(cache)
    own = {k: data.config[k] for k in POSTPROCESS_FIELDS}
    return settings.model, evaluate_thresholds(data, own)[settings.metric]


def _best(results, settings: SearchSettings):
    """The best trial on the first metric; ties go to the better one on the next metrics, so the best of a
    multi-objective search is on its Pareto front."""
    ok = [r for r in results if r.error is None and r.metrics and settings.metric in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error).splitlines()[0] for r in results if r.error is not None)[:2000]
        raise UserError(f"no trial finished an epoch, nothing to register ({errors or 'no results'})")
    signs = [1 if mode == "max" else -1 for mode in settings.modes]

    def key(r):
        return tuple(
            s * r.metrics.get(m, -s * float("inf")) for s, m in zip(signs, settings.metrics, strict=True)
        )

    return max(ok, key=key)


def _trial_run_id(parent_id: str, trial_id: str) -> str:
    runs = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' AND tags.trial_name LIKE '%{trial_id}'",
    )
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run for trial {trial_id}, found {len(runs)}")
    return runs[0].info.run_id


def grace_period(settings: SearchSettings, epochs: int) -> int:
    """ASHA's first rung: the settings' value, or a quarter of the epochs (at least 2). The validation AP of
    a from-scratch detector is noise for its first few epochs (dsb2018_cpu: 0.003, 0.014, 0.071 at epochs
    2-4, 0.19-0.24 at 7-12): a fixed rung at 2 would stop trials on noise."""
    return settings.grace_period or max(2, epochs // 4)
