"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials, tracked in MLflow; the best
config is written as a recipe file and the best model registered (alias `champion` if it beats the current
champion on the same validation data).

    python -m platform.tune --space rpn_anchors
    python -m platform.tune --space optimizer --num-samples 8 --max-epochs 6 min_size=256
    python -m platform.tune --space thresholds --model models:/dsb2018_quick@champion --metric kaggle_mAP
    python -m platform.tune --space roi_heads --metric segm_AP,val_ms_per_image --mode max,min
    python -m platform.tune --resume                       # continue the latest search after a crash
    python -m platform.tune --list-spaces

key=value overrides set config fields; a searched field given this way is fixed (no longer searched).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlflow

from datasets.errors import UserError
from platform import _cli
from trainers import console
from trainers.config import to_dict

DESCRIPTION = __doc__.split("\n\n")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.tune",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--space", help="named search space (see --list-spaces)")
    p.add_argument("--list-spaces", action="store_true", help="list the search spaces and exit")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="SEARCH",
        help="continue a stopped search (its name, printed at its start; default: the latest)",
    )
    p.add_argument(
        "--recipe", help="base config: a recipe name or a YAML file (default: the space's, e.g. dsb2018_demo)"
    )
    p.add_argument("--data", help="dataset folder (default: the bundled DSB2018 sample)")
    p.add_argument(
        "--model",
        help="thresholds space: the trained model whose validation predictions are searched "
        "(default: models:/<register-as>@champion)",
    )
    p.add_argument(
        "--num-samples", type=int, help="trials (default 4, keeping the CPU demo near 10 min; thresholds 64)"
    )
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: the recipe's)")
    p.add_argument(
        "--metric",
        help="metric to optimise, reported every epoch (default: segm_AP, or volume_auc for classifiers); "
        "several, comma-separated, for a multi-objective search reported as a Pareto front",
    )
    p.add_argument("--mode", help="max or min, one per metric (default: min for losses and times, else max)")
    p.add_argument("--searcher", default="tpe", help="tpe (Optuna TPE, seeded), random, or grid")
    p.add_argument("--grid-points", type=int, default=3, help="grid: values per numeric parameter")
    p.add_argument(
        "--scheduler", default="asha", help="asha (early stopping) or fifo (every trial its full budget)"
    )
    p.add_argument(
        "--grace-period",
        type=int,
        help="ASHA: epochs before a trial can be stopped (default: a quarter of the epochs, at least 2)",
    )
    p.add_argument(
        "--reduction-factor", type=float, default=2, help="ASHA: keep 1/this of trials at each rung"
    )
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train (DDP) workers per trial")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial, split over its workers")
    p.add_argument(
        "--cpus-per-worker", type=float, help="CPUs per worker (default: all CPUs / concurrent workers)"
    )
    p.add_argument(
        "--concurrent-trials", type=int, help="trials run at the same time (default 1; thresholds: CPUs)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the searcher")
    p.add_argument("--experiment", help="MLflow experiment (default: the recipe name)")
    p.add_argument("--register-as", help="registered model name (default: the experiment name)")
    p.add_argument(
        "--force-champion",
        action="store_true",
        help="point alias champion at the best trial's model even if it does not beat the champion",
    )
    p.add_argument("--recipe-out", help="best config's recipe file (default: best_recipes/<search>.yaml)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or .mlflow/ here)"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--storage-path",
        help="Ray results and checkpoints (default: .ray_results/ here); "
        "a shared filesystem or s3:// URI on a cluster",
    )
    _cli.add_verbose(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    return p


MINIMISED = ("loss", "_ms", "latency", "time", "_s")


def default_mode(metric: str) -> str:
    return "min" if any(part in metric for part in MINIMISED) else "max"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing, as the search modules below: --help answers before torch and Ray load.
    from search_spaces import SPACES, default_recipe, get_space
    from trainers.config import parse_overrides

    if args.list_spaces:
        for name, space in sorted(SPACES.items()):
            how = "on cached predictions of --model" if space.on_predictions else f"recipe {space.recipe}"
            print(f"{name:12s} {space.description} ({how})")
        return 0
    for flag in ("num_samples", "workers_per_trial", "concurrent_trials"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            value = getattr(args, flag)
            raise UserError(f"--{flag.replace('_', '-')}: expected a positive integer, got {value}")
    uri = _cli.tracking_uri(args.tracking_uri)
    if args.resume:
        return resume(args, uri)
    if not args.space:
        raise UserError(f"--space is required; valid: {', '.join(sorted(SPACES))}")
    space = get_space(args.space)
    recipe = args.recipe or default_recipe(args.space)
    overrides = parse_overrides(args.overrides)
    cfg = _cli.base_config(recipe, args.data, args.overrides, args.max_epochs)
    if not space.define_by_run:
        unknown = sorted(set(space.fn()) - set(to_dict(cfg)))
        if unknown:
            raise UserError(
                f"--space {args.space}: its keys {', '.join(unknown)} are not fields of recipe {recipe} "
                f"({type(cfg).__name__}); pick a recipe of the same kind"
            )
    experiment = args.experiment or Path(recipe).stem
    model_name = args.register_as or experiment

    from trainers.search.driver import run_search
    from trainers.search.settings import SearchSettings, check_settings
    from trainers.tasks import task_of

    metrics = tuple((args.metric or task_of(cfg).metric).split(","))
    modes = tuple(args.mode.split(",")) if args.mode else tuple(default_mode(m) for m in metrics)
    predictions = space.on_predictions
    settings = SearchSettings(
        space_name=args.space,
        num_samples=args.num_samples or (64 if predictions else 4),
        metrics=metrics,
        modes=modes,
        experiment=experiment,
        model_name=model_name,
        tracking_uri=uri,
        storage_path=_cli.storage_path(args.storage_path),
        searcher=args.searcher,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        grid_points=args.grid_points,
        workers_per_trial=args.workers_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        concurrent_trials=args.concurrent_trials or (os.cpu_count() or 1 if predictions else 1),
        seed=args.seed,
        overrides=overrides,
        model=(args.model or f"models:/{model_name}@champion") if predictions else "",
        recipe_out=args.recipe_out or "",
        address=args.address,
        repo=str(_cli.REPO),
    )
    check_settings(settings, space)
    _cli.use_experiment(uri, experiment)  # also points the registry at `uri` for --model models:/...
    resolve_model(settings)  # a missing model is a one-line error before Ray starts or a run is opened
    started = time.time()
    settings.name = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with console.quiet(_cli.log_file(settings.storage_path, settings.name), args.verbose):
        summary = run_search(cfg, space, settings)
        registration = register(summary, args.force_champion)
    return report(summary, registration, uri, started)


def resume(args, uri: str) -> int:
    """--resume: continue a stopped search, register its best model and report."""
    from trainers.search.driver import resume_search

    started = time.time()
    log = _cli.LOCAL_RESULTS / "logs" / f"resume-{args.resume}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with console.quiet(log, args.verbose):
        summary = resume_search(args.resume, uri, args.address, str(_cli.REPO))
        registration = register(summary, args.force_champion)
    return report(summary, registration, uri, started)


def resolve_model(settings) -> None:
    """A predictions space's model (settings.model) as a local checkpoint folder, and a registered alias
    pinned to the version it names: before its search starts, and again before a resumed one registers (on
    another machine, or after the download folder was cleaned)."""
    if not settings.model or (settings.model_folder and Path(settings.model_folder).is_dir()):
        return
    from deploy.registry import registry_version, resolve  # here, as in main: --help stays fast

    settings.model_folder = str(resolve(settings.model))
    name, version = registry_version(settings.model)
    if version:
        # Pinned to the version searched: the alias may move during the search, and the registration
        # compares with the searched model's own thresholds only when that version is still the champion.
        settings.model = f"models:/{name}/{version}"


def register(summary, force: bool):
    """Register the search's best model, logged in its trial's nested MLflow run; the champion rule moves
    the alias only to a model that beats the champion (or with --force-champion). The outcome is noted on
    the search's parent run."""
    from deploy.champion import register_candidate  # here, as in main: --help stays fast
    from trainers.search.driver import best_checkpoint

    s = summary.settings
    resolve_model(s)
    with mlflow.start_run(run_id=summary.parent_run_id):
        with mlflow.start_run(run_id=summary.best_run_id, nested=True), tempfile.TemporaryDirectory() as tmp:
            registration = register_candidate(
                best_checkpoint(summary, Path(tmp)),
                s.model_name,
                summary.best_config,
                s.metric,
                s.mode,
                summary.best_value,
                baseline=summary.baseline,
                force=force,
            )
        mlflow.log_params(
            {
                "registered_model": s.model_name,
                "registered_version": registration.version.version,
                "promoted_to_champion": registration.promoted,
            }
        )
    return registration


def versus_baseline(best: float, metric: str, mode: str, method: str, baseline: dict) -> str:
    """Whether the best trial beat the classical baseline (a row of the trial table, never registered)."""
    value = baseline[metric]
    beat = best > value if mode == "max" else best < value
    verdict = "is better" if beat else "is NOT better: learning has not yet beaten a threshold"
    return (
        f"classical baseline ({method}) on the same validation images: {metric}={value:.4f}; "
        f"the best trial {verdict}"
    )


def report(summary, registration, uri: str, started: float) -> int:
    s = summary.settings
    print()
    print(summary.table)
    if summary.pareto:
        print(f"\nPareto front ({', '.join(f'{m} {d}' for m, d in zip(s.metrics, s.modes, strict=True))}):")
        print(summary.pareto)
    print()
    print(f"best trial: {summary.best_trial}  {s.metric}={summary.best_value:.4f}")
    if summary.classical and s.metric in summary.classical[1]:
        print(versus_baseline(summary.best_value, s.metric, s.mode, *summary.classical))
    print(f"best config: {summary.recipe_path}  (python -m platform.train --recipe {summary.recipe_path})")
    print(registration.message(s.metric, summary.best_value))
    print(f"MLflow: experiment '{s.experiment}', parent run {summary.parent_run_id} (search {s.name})")
    print(f"browse: {_cli.browse_hint(uri)}")
    print(f"wall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    _cli.run(main)
