"""Driver side of a search: Ray Tune over trials (Ray Train runs, or evaluations of cached predictions for a
`thresholds` space), an Optuna searcher (TPE, random) or a grid, ASHA or FIFO scheduling, one MLflow parent
run with a nested run per trial, and at the end: the trial table, the best config as a recipe file, plots
of the search, and the best model registered (alias `champion` only when it beats the current one).

A search is resumable: its settings are an artifact of the parent run, Tune's experiment state is in the
storage path, and `resume_search` picks both up after the driver died (trainers of unfinished trials
continue from their last epoch checkpoint)."""

import csv
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlflow
import optuna
import ray
import yaml
from mlflow.entities import RunTag
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from datasets.errors import UserError
from datasets.records import write_text_atomic
from search_spaces import Space, distributions, get_space, optuna_space
from deploy import champion
from trainers.config import config_class, from_dict, to_dict
from trainers.ray_seam import (
    CHECKPOINT_PATH_KEY,
    NODE_KEYS,
    checkpoint_at,
    checkpoint_folder,
    experiment_path,
    init_ray,
)
from trainers.tasks import task_of, tune_trial

log = logging.getLogger(__name__)
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for each trial's driver function
TRIAL_MAX_FAILURES = 2  # a trial whose worker dies restarts from its last checkpoint (as platform.train)
STATE_ARTIFACT = "search_state.json"
SEARCHERS = ("tpe", "random", "grid")
SCHEDULERS = ("asha", "fifo")
MAX_GRID = 1000  # trials; a bigger grid is a mistake on any machine this runs on


@dataclass
class SearchSettings:
    space_name: str
    num_samples: int
    metrics: tuple[str, ...]  # the first is optimised (and ranks the table); more = multi-objective
    modes: tuple[str, ...]  # max or min, one per metric
    experiment: str
    model_name: str
    tracking_uri: str
    storage_path: str
    searcher: str = "tpe"
    scheduler: str = "asha"
    grace_period: int = 2
    reduction_factor: float = 2
    grid_points: int = 3  # values per numeric parameter of a grid search
    workers_per_trial: int = 1
    gpus_per_trial: float = 0
    cpus_per_worker: float | None = None
    concurrent_trials: int = 1
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # key=value from the command line: fixed, not searched
    model: str = ""  # predictions spaces: the trained model whose validation predictions are searched
    model_folder: str = ""  # its local checkpoint folder (resolved once, before the search starts)
    recipe_out: str = ""  # where the best config goes as a recipe file ("" = best_recipes/<search>.yaml)
    address: str | None = None
    repo: str | None = None  # shipped to workers as working_dir when running on a cluster
    name: str = field(default="")  # the search's name: Tune experiment folder and MLflow tag

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def fixed(self) -> tuple[str, ...]:
        return tuple(self.overrides)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass
class SearchSummary:
    table: str
    rows: list[dict]
    best_trial: str
    best_value: float
    registration: champion.Registration
    parent_run_id: str
    recipe_path: Path
    settings: SearchSettings
    pareto: str = ""  # multi-objective: the Pareto front as a table


def check_settings(settings: SearchSettings, space: Space) -> None:
    """Every user mistake in the search flags, before Ray starts."""
    if settings.searcher not in SEARCHERS:
        raise UserError(f"--searcher: unknown '{settings.searcher}'; valid: {', '.join(SEARCHERS)}")
    if settings.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: unknown '{settings.scheduler}'; valid: {', '.join(SCHEDULERS)}")
    if len(settings.modes) != len(settings.metrics):
        raise UserError(
            f"--mode: give one mode per --metric ({len(settings.metrics)} metrics, "
            f"{len(settings.modes)} modes)"
        )
    for mode in settings.modes:
        if mode not in ("max", "min"):
            raise UserError(f"--mode: expected max or min, got '{mode}'")
    if settings.searcher == "grid" and space.define_by_run:
        raise UserError(
            f"--searcher grid: space {space.name} is conditional (define-by-run) and has no fixed grid; "
            "use --searcher tpe or random"
        )
    if settings.searcher == "grid" and settings.multi_objective:
        raise UserError("--searcher grid: a multi-objective search needs --searcher tpe or random")
    if settings.grid_points < 2:
        raise UserError(f"--grid-points: expected 2 or more, got {settings.grid_points}")
    if settings.grace_period < 1 or settings.reduction_factor <= 1:
        raise UserError("--grace-period: expected >= 1 epoch; --reduction-factor: expected > 1")
    if settings.searcher == "grid":
        size = grid_size(grid(_dict_space(space, settings), settings.grid_points))
        if size > MAX_GRID:
            raise UserError(
                f"--searcher grid: space {space.name} makes {size} trials (> {MAX_GRID}); "
                "fix some of its keys with key=value or lower --grid-points"
            )


# ---- the search ---------------------------------------------------------------------------------------


def run_search(cfg, space: Space, settings: SearchSettings) -> SearchSummary:
    """Search `space` around the base config `cfg` (a MaskRCNNConfig or a ClassifierConfig); `settings`
    passed check_settings."""
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
        tuner = tune.Tuner(
            _trainable(space, settings, cache),
            param_space=_param_space(cfg, space, settings),
            tune_config=_tune_config(cfg, space, settings, categories),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=settings.storage_path,
                verbose=1,
                callbacks=[_mlflow_callback(settings, parent)],
                # A trial whose own process is lost with its node is started again (its Train run then
                # continues from its last checkpoint); a failure inside training is retried by Train.
                failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
            ),
        )
        print(f"search {settings.name} (after an interruption: --resume {settings.name})", flush=True)
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
        print(f"resuming search {settings.name} (MLflow parent run {parent.info.run_id})", flush=True)
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


def _param_space(cfg, space: Space, settings: SearchSettings) -> dict:
    """The trial configs' constants (every config field, so each trial's MLflow params are its whole
    config); for a grid, also the grid. Searched keys are left to the searcher."""
    constants = to_dict(cfg)
    searched = _dict_space(space, settings)
    if searched is None:  # define-by-run: the searcher suggests, its captured names override constants
        return constants
    constants = {k: v for k, v in constants.items() if k not in searched}
    if settings.searcher == "grid":
        return {**constants, **grid(searched, settings.grid_points)}
    return constants


def _dict_space(space: Space, settings: SearchSettings) -> dict | None:
    if space.define_by_run:
        return None
    return {k: v for k, v in space.fn().items() if k not in settings.fixed}


def _searcher_space(space: Space, settings: SearchSettings, cfg, categories):
    """What OptunaSearch searches: the dict less the fixed keys, or the define-by-run function with the
    fixed keys' command-line values put back over whatever it suggested."""
    if not space.define_by_run:
        return _dict_space(space, settings)
    fn = optuna_space(space, tuple(categories))
    fixed = _as_params({k: getattr(cfg, k) for k in settings.fixed if hasattr(cfg, k)})
    return partial(_with_fixed, fn=fn, fixed=fixed) if fixed else fn


def _with_fixed(trial, fn, fixed: dict) -> dict | None:
    # A module-level function (under functools.partial): Tune pickles the searcher, and with it this space.
    return {**(fn(trial) or {}), **fixed} or None


def _as_params(values: dict) -> dict:
    # Tuple fields travel as "a,b,c" strings, as the spaces sample them.
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in values.items()}


def grid(space: dict, points: int) -> dict:
    """Ray Tune grid_search over a dict space: every choice of a categorical, `points` values spanning a
    numeric range (geometrically for log-uniform ones, rounded and de-duplicated for integers)."""
    import numpy as np
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    out = {}
    for key, domain in space.items():
        if isinstance(domain, Categorical):
            values = list(domain.categories)
        elif isinstance(domain, Float | Integer):
            log = isinstance(domain.get_sampler(), LogUniform)
            upper = domain.upper - (1 if isinstance(domain, Integer) else 0)  # randint's upper is exclusive
            span = np.geomspace if log else np.linspace
            values = span(domain.lower, upper, points).tolist()
            if isinstance(domain, Integer):
                values = sorted({round(v) for v in values})
        else:
            raise UserError(f"--searcher grid: cannot make a grid of {key} ({type(domain).__name__})")
        out[key] = tune.grid_search(values)
    return out


def grid_size(space: dict) -> int:
    size = 1
    for value in space.values():
        if isinstance(value, dict) and "grid_search" in value:
            size *= len(value["grid_search"])
    return size


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
            grace_period=min(settings.grace_period, cfg.epochs),
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


def config_fields(config: dict) -> dict:
    """A trial's config without the search-only parameters (names with a dot, such as
    `class_score_thresh.0`, that a define-by-run space combines into a field's value)."""
    return {k: v for k, v in config.items() if "." not in k}


def search_trial(config: dict, **trainer_kwargs) -> None:
    tune_trial(config_fields(config), **trainer_kwargs)


def thresholds_trial(config: dict, cache: str) -> None:
    """One trial of a predictions space: post-process the cached validation predictions and score them."""
    from trainers.detection.postprocess import POSTPROCESS_FIELDS
    from trainers.detection.thresholds import evaluate_thresholds

    params = {k: v for k, v in config_fields(config).items() if k in POSTPROCESS_FIELDS}
    tune.report({**evaluate_thresholds(_load_cache(cache), params), "epoch": 1})


_CACHES: dict[str, object] = {}


def _load_cache(path: str):
    # Reused trial actors keep the (read-only) predictions between trials.
    from trainers.detection.thresholds import load_cache

    if path not in _CACHES:
        _CACHES[path] = load_cache(Path(path))
    return _CACHES[path]


def _prepare_predictions(settings: SearchSettings):
    """The model's config and categories, and its validation predictions cached once for all trials."""
    from trainers.config import MaskRCNNConfig, apply_overrides
    from trainers.detection.thresholds import cache_predictions, load_cache

    folder = _model_folder(settings)
    if not (folder / "categories.json").is_file():
        raise UserError(f"--model {settings.model}: --space thresholds needs a Mask R-CNN, not a classifier")
    cfg = from_dict(MaskRCNNConfig, json.loads((folder / "config.json").read_text()), str(folder))
    cfg = apply_overrides(cfg, settings.overrides)
    categories = tuple(c["name"] for c in json.loads((folder / "categories.json").read_text()))
    if "://" in settings.storage_path:
        raise UserError("--space thresholds: needs a local --storage-path for its predictions cache")
    out = Path(settings.storage_path) / settings.name / "predictions.pkl"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"caching validation predictions of {settings.model} ...", flush=True)
    started = time.perf_counter()
    cache_predictions(folder, out)
    load_cache(out)  # fails here, on the driver, if the cache is unreadable
    print(f"cached in {time.perf_counter() - started:.1f} s: {out}", flush=True)
    mlflow.log_param("search.model_folder", str(folder))
    return cfg, categories, str(out)


class _MLflowLogger(MLflowLoggerCallback):
    """Ray's MLflow callback made resumable: a trial restarted by a resumed search logs into the nested run
    it already had (found by its parent and trial name) instead of opening a second one, and metrics are
    logged at step = epoch, which a restarted trial continues (Tune's own iteration count restarts)."""

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
        run_id = self._trial_runs[trial]
        self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=result, step=step)
        tags = [RunTag(key, result[key]) for key in NODE_KEYS if key in result]
        if tags:  # every epoch, as platform.train's callback does: a restart may have moved the trial
            mlflow.MlflowClient(self.tracking_uri).log_batch(run_id, tags=tags)


def _mlflow_callback(settings: SearchSettings, parent) -> _MLflowLogger:
    return _MLflowLogger(
        tracking_uri=settings.tracking_uri,
        experiment_name=settings.experiment,
        tags={"mlflow.parentRunId": parent.info.run_id, "search": settings.name},
        parent_run_id=parent.info.run_id,
        experiment_id=parent.info.experiment_id,
    )


# ---- the end of a search: table, recipe, plots, registration -----------------------------------------


def _finish(results, cfg, space: Space, settings: SearchSettings, parent_id: str, categories, cache: str):
    headline = ("kaggle_mAP", "segm_AP", "detections") if space.on_predictions else task_of(cfg).headline
    params = _param_names(results, space, settings, categories)
    rows = _rows(results, params, cfg.epochs, settings, headline)
    table = format_table(rows, params, settings.metric, settings.mode)
    mlflow.log_text(table, "trials.txt")
    mlflow.log_text(_csv(rows), "trials.csv")
    if not space.on_predictions:
        _log_curves(results, settings.metric)
    study = rebuild_study(results, space, settings, categories)
    log_search_figures(study, settings)
    pareto = ""
    if settings.multi_objective:
        pareto = format_table(
            [r for r in rows if r["trial"] in {t.user_attrs["trial"] for t in study.best_trials}],
            params,
            settings.metric,
            settings.mode,
        )
        mlflow.log_text(pareto, "pareto_front.txt")
    best = _best(results, settings)
    best_cfg = from_dict(config_class(config_fields(best.config)), config_fields(best.config), "best trial")
    recipe_path = write_recipe(best_cfg, settings)
    mlflow.log_artifact(str(recipe_path))
    trial_id = best.metrics["trial_id"]
    best_run = _trial_run_id(parent_id, trial_id)
    value = best.metrics[settings.metric]
    with mlflow.start_run(run_id=best_run, nested=True), tempfile.TemporaryDirectory() as tmp:
        if space.on_predictions:
            checkpoint = _thresholded_checkpoint(best_cfg, settings, Path(tmp))
            baseline = _baseline_on_cache(cache, settings)
        else:
            trained = checkpoint_at(settings.storage_path, best.metrics[CHECKPOINT_PATH_KEY])
            checkpoint, baseline = checkpoint_folder(trained, Path(tmp)), None
        registration = champion.register_candidate(
            checkpoint,
            settings.model_name,
            best_cfg,
            settings.metric,
            settings.mode,
            value,
            baseline=baseline,
        )
    mlflow.log_params(
        {
            "best_trial": trial_id,
            "registered_model": settings.model_name,
            "registered_version": registration.version.version,
            "promoted_to_champion": registration.promoted,
        }
    )
    mlflow.log_metric(f"best_{settings.metric}", value)
    return SearchSummary(table, rows, trial_id, value, registration, parent_id, recipe_path, settings, pareto)


def _model_folder(settings: SearchSettings) -> Path:
    """The searched model's checkpoint folder: as resolved at the start, or again (a resumed search on
    another machine, or after the download folder was cleaned)."""
    if settings.model_folder and Path(settings.model_folder).is_dir():
        return Path(settings.model_folder)
    settings.model_folder = str(champion.model_folder(settings.model))
    return Path(settings.model_folder)


def _thresholded_checkpoint(cfg, settings: SearchSettings, tmp: Path) -> Path:
    """The searched model's checkpoint with the best post-processing thresholds in its config."""
    folder = _model_folder(settings)
    out = tmp / "checkpoint"
    shutil.copytree(folder, out)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return out


def _baseline_on_cache(cache: str, settings: SearchSettings) -> tuple[str, float]:
    """The searched model with its own thresholds, scored on the same cached predictions: the number a
    registered version must beat when that model is the champion."""
    from trainers.detection.postprocess import POSTPROCESS_FIELDS
    from trainers.detection.thresholds import evaluate_thresholds

    data = _load_cache(cache)
    own = {k: data.config[k] for k in POSTPROCESS_FIELDS}
    return settings.model, evaluate_thresholds(data, own)[settings.metric]


def write_recipe(cfg, settings: SearchSettings) -> Path:
    """The best trial's whole config as a YAML recipe (`platform.train --recipe PATH`), written atomically."""
    path = Path(settings.recipe_out or Path("best_recipes") / f"{settings.name}.yaml").expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in to_dict(cfg).items()}
    header = f"# best config of search {settings.name} ({settings.metric}, space {settings.space_name})\n"
    return write_text_atomic(path, header + yaml.safe_dump(values, sort_keys=False))


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


def _param_names(results, space: Space, settings: SearchSettings, categories) -> list[str]:
    searched = _dict_space(space, settings)
    if searched is not None:
        return list(searched)
    names: dict[str, None] = {}
    for r in results:
        if r.config:
            names.update(dict.fromkeys(_distributions(space, r.config, categories)))
    return [n for n in names if n.split(".")[0] not in settings.fixed]  # class_score_thresh.0 too


def _distributions(space: Space, config: dict, categories) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FixedTrial warns about values outside a range: fixed ones
        return distributions(space, config, tuple(categories))


def _rows(results, params: list[str], max_epochs: int, settings: SearchSettings, headline) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        epochs = int(m.get("epoch", 0))
        if r.error is not None:
            status = "ERROR"
        elif epochs >= max_epochs or CHECKPOINT_PATH_KEY not in m:
            status = "completed"
        elif m.get("early_stopped"):
            status = f"early stop@{epochs}"
        else:
            status = f"stopped@{epochs} (ASHA)"
        row = {"trial": m.get("trial_id", "?"), **{k: r.config.get(k) for k in params}}
        if CHECKPOINT_PATH_KEY in m:
            row["epochs"] = epochs
        row.update({k: m.get(k) for k in dict.fromkeys((*headline[1:], *settings.metrics))})
        row["status"] = status
        rows.append(row)
    return rows


def format_table(rows: list[dict], params: list[str], metric: str, mode: str) -> str:
    """Trials sorted best first; floats to 4 significant digits."""
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
    if isinstance(value, float):  # 4 significant digits: learning rates are small, AP is not
        return f"{value:.4g}"
    return str(value)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def rebuild_study(results, space: Space, settings: SearchSettings, categories) -> optuna.Study:
    """An in-memory Optuna study of the finished trials, for Optuna's plots and parameter importances:
    trials that reached their last epoch (or stopped early on their own) are complete; trials ASHA stopped
    are pruned, with their per-epoch values."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if m == "max" else "minimize" for m in settings.modes]
    study = optuna.create_study(directions=directions)
    ordered = sorted((r for r in results if r.metrics and r.config), key=lambda r: r.metrics.get("trial_id"))
    names = _param_names(results, space, settings, categories)
    for r in ordered:
        dists = {k: d for k, d in _distributions(space, r.config, categories).items() if k in names}
        params = {k: r.config[k] for k in dists}
        values = [r.metrics.get(m) for m in settings.metrics]
        stopped = CHECKPOINT_PATH_KEY in r.metrics and r.metrics.get("epoch", 0) < r.config.get("epochs", 0)
        stopped = stopped and not r.metrics.get("early_stopped")
        if r.error is not None or None in values:
            state, values = optuna.trial.TrialState.FAIL, None
        elif stopped and not settings.multi_objective:
            state, values = optuna.trial.TrialState.PRUNED, None
        else:
            state = optuna.trial.TrialState.COMPLETE
        history = r.metrics_dataframe
        intermediate = {}
        if history is not None and settings.metric in history and "epoch" in history:
            pairs = zip(history["epoch"], history[settings.metric], strict=True)
            intermediate = {int(e): float(v) for e, v in pairs if v == v}  # v == v: not NaN
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                values=values,
                state=state,
                intermediate_values=intermediate if not settings.multi_objective else {},
                user_attrs={"trial": r.metrics.get("trial_id")},
            )
        )
    return study


def log_search_figures(study: optuna.Study, settings: SearchSettings) -> dict:
    """Optuna's plots of the search, logged to the active (parent) MLflow run: metric per trial, parameter
    importances (fANOVA), parallel coordinates, and the Pareto front of a multi-objective search. A plot
    that needs more finished trials than there are is skipped with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    target = (lambda t: t.values[0]) if settings.multi_objective else None
    name = settings.metric
    kw = dict(target=target, target_name=name)
    plots = {
        "search_history.png": lambda: ovm.plot_optimization_history(study, **kw),
        "param_importances.png": lambda: ovm.plot_param_importances(study, **kw),
        "parallel_coordinates.png": lambda: ovm.plot_parallel_coordinate(study, **kw),
    }
    if settings.multi_objective:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=list(settings.metrics))
    logged = {}
    for artifact, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.warning("search plot %s skipped: %s", artifact, e)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(max(8, fig.get_size_inches()[0]), max(5, fig.get_size_inches()[1]))
        fig.tight_layout()
        mlflow.log_figure(fig, artifact)
        logged[artifact] = fig
        plt.close(fig)
    return logged


def _log_curves(results, metric: str) -> None:
    """Per-trial learning curves (metric and training loss per epoch) as an MLflow figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        df = r.metrics_dataframe
        if df is None or df.empty or metric not in df or "epoch" not in df:
            continue
        label = r.metrics.get("trial_id", "?")
        axes[0].plot(df["epoch"], df[metric], marker="o", label=label)
        if "train_loss" in df:
            axes[1].plot(df["epoch"], df["train_loss"], marker="o", label=label)
    axes[0].set(xlabel="epoch", ylabel=metric, title=f"validation {metric} per trial")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss per trial")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    mlflow.log_figure(fig, "learning_curves.png")
    plt.close(fig)
