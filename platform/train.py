"""Train one recipe as one tracked run: a Ray Train TorchTrainer (DDP over --workers), one MLflow run with
every config field as a param and per-epoch metrics; the final model is logged, and registered with the
alias `champion` when --register-as is given.

    python -m platform.train --recipe dsb2018_cpu
    python -m platform.train --recipe dsb2018_demo epochs=2 min_size=128 max_size=160 --register-as demo
    python -m platform.train --recipe foram_maskrcnn --data /data/foram --workers 2 --gpus 2 amp=bf16
"""

import argparse
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli

DESCRIPTION = __doc__.split("\n\n")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: any config field as key=value, e.g. epochs=2 lr=0.005 phases=40:2,80:5:0.1",
    )
    p.add_argument("--recipe", default="dsb2018_demo", help="base config: a recipe name or a YAML file")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--data", help="dataset folder (default: the bundled DSB2018 sample)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train (DDP) workers")
    p.add_argument("--gpus", type=float, default=0, help="GPUs in all, split over the workers")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: all CPUs / workers)")
    p.add_argument("--experiment", help="MLflow experiment (default: the recipe name)")
    p.add_argument("--register-as", help="register the final model under this name, alias champion")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or .mlflow/ here)"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage-path", help="Ray results and checkpoints (default: .ray_results/ here)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainers.recipes import RECIPES

    if args.list_recipes:
        for name, (_, description) in sorted(RECIPES.items()):
            print(f"{name:20s} {description}")
        return 0
    if args.workers < 1:
        raise UserError(f"--workers: expected a positive integer, got {args.workers}")
    if args.gpus < 0:
        raise UserError(f"--gpus: expected 0 or more, got {args.gpus}")
    cfg = _cli.base_config(args.recipe, args.data, args.overrides)
    if cfg.amp != "off" and args.gpus == 0:
        raise UserError(f"amp: '{cfg.amp}' needs GPUs (--gpus); on CPU use amp=off")
    if cfg.norm == "sync_bn" and args.workers > 1 and args.gpus == 0:
        raise UserError("norm: sync_bn needs GPU workers (--gpus); on CPU use norm=group")
    experiment = args.experiment or Path(args.recipe).stem
    uri = _cli.tracking_uri(args.tracking_uri)
    experiment_id = _cli.use_experiment(uri, experiment)

    import mlflow
    import ray

    from deploy.registry import log_detector, register
    from trainers.config import to_dict
    from trainers.loop import make_trainer, mlflow_epoch_callback
    from trainers.ray_seam import init_ray

    init_ray(args.address, str(_cli.REPO))
    cpus = args.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // args.workers)
    run_name = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.time()
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(to_dict(cfg))
        mlflow.log_dict(to_dict(cfg), "config.json")
        mlflow.set_tags({"recipe": args.recipe, "workers": args.workers, "gpus": args.gpus})
        trainer = make_trainer(
            to_dict(cfg),
            name=run_name,
            storage_path=_cli.storage_path(args.storage_path),
            num_workers=args.workers,
            use_gpu=args.gpus > 0,
            cpus_per_worker=cpus,
            gpus_per_worker=args.gpus / args.workers,
            callbacks=[mlflow_epoch_callback(uri, run.info.run_id)],
        )
        result = trainer.fit()
        info = log_detector(Path(result.checkpoint.path))
        version = register(info.model_uri, args.register_as) if args.register_as else None
    metrics = result.metrics or {}
    print(
        "final: "
        + "  ".join(f"{k}={metrics[k]:.4f}" for k in ("train_loss", "bbox_AP", "segm_AP") if k in metrics)
    )
    print(f"MLflow: experiment '{experiment}', run {run.info.run_id}; model {info.model_uri}")
    if version is not None:
        print(f"registered model: name={version.name} version={version.version} alias=champion")
    print(f"browse: {_cli.browse_hint(uri)}")
    print(f"wall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    _cli.run(main)
