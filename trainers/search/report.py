"""The end of a search, for the user: the trial table (text and CSV), Optuna's plots of the search rebuilt
from Tune's results, per-trial learning curves, and the best config as a recipe file; logged to the
search's MLflow parent run (the active run when these are called)."""

import logging
import warnings
from pathlib import Path

import mlflow
import optuna
import yaml

from datasets.records import write_text_atomic
from search_spaces import Space, distributions
from trainers.config import to_dict
from trainers.evaluation import rows_csv
from trainers.plots import learning_curves, log_figure
from trainers.ray_seam import CHECKPOINT_PATH_KEY
from trainers.search.settings import SearchSettings, searched
from trainers.tasks import task_of

log = logging.getLogger(__name__)
PREDICTIONS_HEADLINE = ("kaggle_mAP", "segm_AP", "detections")  # a thresholds trial's table columns


def log_trials(
    results, cfg, space: Space, settings: SearchSettings, categories, classical=None
) -> tuple[str, list[dict], str]:
    """The trial table (best first), its rows, and for a multi-objective search the Pareto front as a
    table ("" otherwise); the tables, the CSV and the plots are logged to the active run. `classical`
    (method, metrics) adds the classical baseline as a row of the table and the CSV, ranked among the
    trials; it is not one of the rows returned (they are the trials)."""
    headline = PREDICTIONS_HEADLINE if space.on_predictions else task_of(cfg).headline
    params = param_names(results, space, settings, categories)
    rows = trial_rows(results, params, cfg.epochs, settings, headline)
    shown = rows + ([baseline_row(rows, *classical)] if classical and rows else [])
    table = format_table(shown, params, settings.metric, settings.mode)
    mlflow.log_text(table, "trials.txt")
    mlflow.log_text(rows_csv(shown), "trials.csv")
    if not space.on_predictions:
        log_curves(results, settings.metric)
    study = rebuild_study(results, space, settings, categories)
    log_search_figures(study, settings)
    pareto = ""
    if settings.multi_objective:
        front = [r for r in rows if r["trial"] in {t.user_attrs["trial"] for t in study.best_trials}]
        pareto = format_table(front, params, settings.metric, settings.mode)
        mlflow.log_text(pareto, "pareto_front.txt")
    return table, rows, pareto


def write_recipe(cfg, settings: SearchSettings) -> Path:
    """The best trial's whole config as a YAML recipe (`platform.train --recipe PATH`), written atomically."""
    path = Path(settings.recipe_out or Path("best_recipes") / f"{settings.name}.yaml").expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in to_dict(cfg).items()}
    header = f"# best config of search {settings.name} ({settings.metric}, space {settings.space_name})\n"
    return write_text_atomic(path, header + yaml.safe_dump(values, sort_keys=False))


def param_names(results, space: Space, settings: SearchSettings, categories) -> list[str]:
    """The searched parameters: a dict space's keys, or the names a define-by-run space suggested."""
    keys = searched(space, settings)
    if keys is not None:
        return list(keys)
    names: dict[str, None] = {}
    for r in results:
        if r.config:
            names.update(dict.fromkeys(_distributions(space, r.config, categories)))
    return [n for n in names if n.split(".")[0] not in settings.fixed]  # class_score_thresh.0 too


def _distributions(space: Space, config: dict, categories) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FixedTrial warns about values outside a range: fixed ones
        return distributions(space, config, tuple(categories))


def trial_rows(results, params: list[str], max_epochs: int, settings: SearchSettings, headline) -> list[dict]:
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


def baseline_row(rows: list[dict], method: str, metrics: dict) -> dict:
    """The classical baseline as a row of the trial table: its metrics in the trials' columns, no
    parameters, and a status saying it is not a trial."""
    row = {column: metrics.get(column) for column in rows[0]}
    return {**row, "trial": f"baseline ({method})", "status": "baseline, not a model"}


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


def rebuild_study(results, space: Space, settings: SearchSettings, categories) -> optuna.Study:
    """An in-memory Optuna study of the finished trials, for Optuna's plots and parameter importances:
    trials that reached their last epoch (or stopped early on their own) are complete; trials ASHA stopped
    are pruned, with their per-epoch values."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if m == "max" else "minimize" for m in settings.modes]
    study = optuna.create_study(directions=directions)
    ordered = sorted((r for r in results if r.metrics and r.config), key=lambda r: r.metrics.get("trial_id"))
    names = param_names(results, space, settings, categories)
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


def _pyplot():
    # Loaded when a search's plots are drawn, with the Agg backend chosen first: the driver may have no
    # display, and pyplot fixes its backend when it is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_search_figures(study: optuna.Study, settings: SearchSettings) -> dict:
    """Optuna's plots of the search, logged to the active (parent) MLflow run: metric per trial, parameter
    importances (fANOVA), parallel coordinates, and the Pareto front of a multi-objective search. A plot
    that needs more finished trials than there are is skipped with a log line."""
    plt = _pyplot()
    from optuna.visualization import matplotlib as ovm  # draws with pyplot: after the backend is chosen

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


def log_curves(results, metric: str) -> None:
    """Per-trial learning curves (metric and training loss per epoch) as an MLflow figure."""
    curves = {}
    for r in results:
        df = r.metrics_dataframe
        if df is None or df.empty or metric not in df or "epoch" not in df:
            continue
        loss = list(df["train_loss"]) if "train_loss" in df else None
        curves[str(r.metrics.get("trial_id", "?"))] = (list(df["epoch"]), list(df[metric]), loss)
    log_figure(learning_curves(curves, metric), "learning_curves.png")
