"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials, tracked in MLflow; the best
trial's model is registered in the MLflow Model Registry with the alias `champion`.

    python -m platform.tune --space rpn_anchors
    python -m platform.tune --space rpn_anchors --recipe dsb2018_demo --num-samples 8 --max-epochs 6 lr=0.005
    python -m platform.tune --list-spaces
"""

import argparse
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli
from trainers.config import to_dict

DESCRIPTION = __doc__.split("\n\n")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.tune",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: any config field as key=value, e.g. lr=0.005 anchor_sizes=8,16,32,64,128",
    )
    p.add_argument("--space", help="named search space (see --list-spaces)")
    p.add_argument("--list-spaces", action="store_true", help="list the search spaces and exit")
    p.add_argument(
        "--recipe", help="base config: a recipe name or a YAML file (default: the space's, e.g. dsb2018_demo)"
    )
    p.add_argument("--data", help="dataset folder (default: the bundled DSB2018 sample)")
    p.add_argument("--num-samples", type=int, default=4, help="trials (4 keep the CPU demo near 10 min)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: the recipe's)")
    p.add_argument(
        "--metric",
        help="metric to optimise, reported every epoch (default: segm_AP, or volume_auc for classifiers)",
    )
    p.add_argument("--mode", default="max", choices=("max", "min"))
    p.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before a trial can be stopped")
    p.add_argument(
        "--reduction-factor", type=float, default=2, help="ASHA: keep 1/this of trials at each rung"
    )
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train (DDP) workers per trial")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial, split over its workers")
    p.add_argument(
        "--cpus-per-worker", type=float, help="CPUs per worker (default: all CPUs / concurrent workers)"
    )
    p.add_argument("--concurrent-trials", type=int, default=1, help="trials run at the same time")
    p.add_argument("--seed", type=int, default=0, help="seeds the searcher (TPE)")
    p.add_argument("--experiment", help="MLflow experiment (default: the recipe name)")
    p.add_argument("--register-as", help="registered model name (default: the experiment name)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or .mlflow/ here)"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--storage-path",
        help="Ray results and checkpoints (default: .ray_results/ here); "
        "a shared filesystem or s3:// URI on a cluster",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from search_spaces import SPACES, default_recipe, get_space

    if args.list_spaces:
        for name, (_, description, recipe) in sorted(SPACES.items()):
            print(f"{name:16s} {description} (recipe {recipe})")
        return 0
    if not args.space:
        raise UserError(f"--space is required; valid: {', '.join(sorted(SPACES))}")
    space = get_space(args.space)
    recipe = args.recipe or default_recipe(args.space)
    cfg = _cli.base_config(recipe, args.data, args.overrides, args.max_epochs)
    unknown = sorted(set(space) - set(to_dict(cfg)))
    if unknown:
        raise UserError(
            f"--space {args.space}: its keys {', '.join(unknown)} are not fields of recipe {recipe} "
            f"({type(cfg).__name__}); pick a recipe of the same kind"
        )
    experiment = args.experiment or Path(recipe).stem
    for flag in ("num_samples", "workers_per_trial", "concurrent_trials"):
        if getattr(args, flag) < 1:
            raise UserError(
                f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}"
            )

    from trainers.search import SearchSettings, run_search
    from trainers.tasks import task_of

    metric = args.metric or task_of(cfg).metric
    settings = SearchSettings(
        space_name=args.space,
        num_samples=args.num_samples,
        metric=metric,
        mode=args.mode,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        workers_per_trial=args.workers_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        concurrent_trials=args.concurrent_trials,
        seed=args.seed,
        experiment=experiment,
        model_name=args.register_as or experiment,
        tracking_uri=_cli.tracking_uri(args.tracking_uri),
        storage_path=_cli.storage_path(args.storage_path),
        address=args.address,
        repo=str(_cli.REPO),
    )
    _cli.use_experiment(settings.tracking_uri, experiment)
    started = time.time()
    summary = run_search(cfg, space, settings)
    print()
    print(summary.table)
    print()
    v = summary.registered
    print(f"best trial: {summary.best_trial}  {metric}={summary.best_value:.4f}")
    print(f"registered model: name={v.name} version={v.version} alias=champion  (models:/{v.name}@champion)")
    print(f"MLflow: experiment '{experiment}', parent run {summary.parent_run_id}")
    print(f"browse: {_cli.browse_hint(settings.tracking_uri)}")
    print(f"wall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    _cli.run(main)
