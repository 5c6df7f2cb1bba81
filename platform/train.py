"""Train one recipe as one tracked run: a Ray Train TorchTrainer (DDP over --workers), one MLflow run with
every config field as a param and per-epoch metrics; the final model is logged, and registered with
--register-as (alias `champion` only if it beats the current champion on the same validation data, or with
--force-champion: deploy/champion.py).

    python -m platform.train --recipe dsb2018_cpu
    python -m platform.train --recipe dsb2018_demo epochs=2 min_size=128 max_size=160 --register-as demo
    python -m platform.train --recipe foram_maskrcnn --data /data/foram --workers 2 --gpus 2 amp=bf16
    python -m platform.train --recipe adrenal3d_cpu --register-as adrenal
    python -m platform.train --recipe foramdeepslice --data /data/foram_volumes/labels.csv --gpus 1
"""

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from datasets.errors import UserError
from platform import _cli
from trainers import console
from trainers.config import ClassifierConfig, apply_overrides

# torch, ray, MLflow and the model code are imported inside the functions that use them: --help and a
# mistyped flag answer at once.

RAY_NAME_TAG = "ray_run_name"  # how --resume finds the Ray run (and its checkpoints) of an MLflow run
RAY_STORAGE_TAG = "ray_storage_path"

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
    p.add_argument(
        "--register-as",
        help="register the final model (of --seeds: the best seed's) under this name; alias champion only "
        "if it beats the current champion on the same validation data",
    )
    p.add_argument(
        "--force-champion",
        action="store_true",
        help="with --register-as: point alias champion at this model even if it does not beat the champion",
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1 and report mean +- std"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue a stopped run (its MLflow run id) from its last checkpoint",
    )
    p.add_argument(
        "--max-failures", type=int, default=2, help="restarts from the last checkpoint when a worker dies"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or .mlflow/ here)"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--storage-path",
        help="Ray results and checkpoints (default: .ray_results/ here); a shared filesystem or s3:// URI "
        "on a cluster",
    )
    _cli.add_verbose(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    return p


BASELINE_SHOWN = ("segm_AP", "bbox_AP", "kaggle_mAP")  # the baseline's numbers printed beside the model's

# Per-epoch bookkeeping, not results: left out of the mean +- std over seeds.
NOT_RESULTS = {
    "epoch",
    "world_size",
    "torch_threads",
    "resumed_at_epoch",
    "train_images",
    "train_optimizer_steps",
    "train_slices",
    "early_stopped",
    "best_epoch",
}


@dataclass
class Outcome:
    cfg: object  # the MaskRCNNConfig trained
    run_id: str  # its MLflow run
    model_uri: str  # the logged model
    metrics: dict  # the last epoch's numeric metrics
    # the classical baseline's metrics on the same validation images (a detector's; {} otherwise)
    baseline: dict = field(default_factory=dict)


def train_run(
    cfg, args, uri: str, experiment_id: str, run_name: str, run_id=None, parent_run_id=None
) -> Outcome:
    """One TorchTrainer = one MLflow run. With `run_id` (--resume) the MLflow run and the Ray run of that
    name continue: Ray Train restores its latest checkpoint from the same storage path and name."""
    import mlflow
    import ray

    from deploy.registry import log_checkpoint
    from trainers.config import to_dict
    from trainers.plots import log_figure, loss_curves
    from trainers.ray_seam import checkpoint_folder
    from trainers.tasks import make_trainer, task_of
    from trainers.tracking import EpochLogger, log_data_inputs

    cpus = args.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // args.workers)
    storage = args.storage_path or str(_cli.LOCAL_RESULTS)  # a given one was checked by check_args()
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=None if run_id else run_name,
        nested=parent_run_id is not None,
    ) as run:
        if run_id is None:
            mlflow.log_params(to_dict(cfg))
            mlflow.log_dict(to_dict(cfg), "config.json")
            log_data_inputs(cfg)  # the runs table's Dataset column
            mlflow.set_tags(
                {
                    "recipe": args.recipe,
                    RAY_NAME_TAG: run_name,
                    RAY_STORAGE_TAG: storage,
                    "workers": args.workers,
                    "gpus": args.gpus,
                }
            )
        elif not args.storage_path:  # where the stopped run checkpointed
            storage = run.data.tags.get(RAY_STORAGE_TAG, storage)
        resume = f"python -m platform.train --resume {run.info.run_id}"
        console.say(f"MLflow run {run.info.run_id} ({run_name}); if it stops, continue it with: {resume}")
        baseline = log_baseline(cfg)
        trainer = make_trainer(
            to_dict(cfg),
            name=run_name,
            storage_path=storage,
            num_workers=args.workers,
            use_gpu=args.gpus > 0,
            cpus_per_worker=cpus,
            gpus_per_worker=args.gpus / args.workers,
            callbacks=[EpochLogger(uri, run.info.run_id)],
            max_failures=args.max_failures,
        )
        with console.RunWatcher(uri, run.info.run_id, cfg.epochs, task_of(cfg).metric):
            result = trainer.fit()
        with tempfile.TemporaryDirectory() as tmp:  # a checkpoint in object storage is downloaded once
            checkpoint = checkpoint_folder(result.checkpoint, Path(tmp))
            info = log_checkpoint(checkpoint)
            log_figure(loss_curves(curve_history(uri, run.info.run_id, cfg)), "plots/loss_curves.png")
            metrics = {
                k: v
                for k, v in (result.metrics or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if isinstance(cfg, ClassifierConfig):
                # The run's model is its best epoch (restore_best): its own numbers, as best_<metric>
                figures, model_metrics = classifier_figures(cfg, checkpoint)
                mlflow.log_metrics({f"best_{k}": v for k, v in model_metrics.items()})
                metrics.update(model_metrics)
            else:
                figures = validation_figures(cfg, checkpoint)
        for name, fig in figures.items():
            log_figure(fig, name)
    return Outcome(cfg, run.info.run_id, info.model_uri, metrics, baseline)


def log_baseline(cfg) -> dict:
    """The classical baseline (cfg.baseline, trainers/detection/baseline.py) on the run's validation
    images, logged to the active run as baseline_<metric> and printed before training: the numbers the
    model has to beat. Never a model: nothing is registered. {} for a classifier or baseline=off."""
    if isinstance(cfg, ClassifierConfig) or cfg.baseline == "off":
        return {}
    import mlflow

    from trainers.detection.baseline import baseline_metrics
    from trainers.detection.train import config_split

    _, val = config_split(cfg)
    metrics = baseline_metrics(val, cfg.baseline, cfg.box_detections_per_img)  # once per process
    mlflow.log_metrics({f"baseline_{k}": v for k, v in metrics.items()})
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in BASELINE_SHOWN)
    console.say(f"baseline ({cfg.baseline}) on the {len(val)} validation images: {shown}")
    return metrics


def versus_baseline(outcome: Outcome) -> str:
    """e.g. "model (last epoch) vs baseline (otsu): segm_AP 0.4100 vs 0.3120, kaggle_mAP ..."; "" without
    a baseline."""
    if not outcome.baseline:
        return ""
    pairs = [
        f"{k} {outcome.metrics[k]:.4f} vs {outcome.baseline[k]:.4f}"
        for k in BASELINE_SHOWN
        if k in outcome.metrics
    ]
    return f"model (last epoch) vs baseline ({outcome.cfg.baseline}): " + ", ".join(pairs)


def validation_figures(cfg, checkpoint: Path) -> dict:
    """PR curves and prediction overlays of the final model on the validation images, by artifact name."""
    import torch

    from datasets.instances import InstanceDataset, coco_ground_truth
    from trainers.detection.inference import predict_records
    from trainers.detection.model import load_checkpoint_model
    from trainers.detection.train import config_split
    from trainers.evaluation import coco_report
    from trainers.plots import evaluation_figures

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, categories = load_checkpoint_model(checkpoint, device)
    _, val = config_split(cfg)
    results = predict_records(
        model,
        val,
        device,
        tile_size=cfg.tile_size,
        tile_overlap=cfg.tile_overlap,
        cfg=cfg,
        categories=categories,
    )
    _, evals = coco_report(coco_ground_truth(InstanceDataset(val)), results, cfg.box_detections_per_img)
    return evaluation_figures(evals, val, results)


def classifier_figures(cfg, checkpoint: Path) -> tuple[dict, dict]:
    """Confusion matrices, ROC curves and per-class F1 (slice and volume level) of the run's model on the
    validation specimens, and its metrics; the report table goes to the run as text."""
    import mlflow

    from trainers.classification.metrics import format_report, operating_point_numbers, report
    from trainers.classification.model import load_classifier_checkpoint
    from trainers.classification.operating_point import describe
    from trainers.classification.train import slice_sets
    from trainers.plots import classification_figures

    predictor = load_classifier_checkpoint(checkpoint)
    _, val, _ = slice_sets(cfg)
    probs = predictor.predict_proba(val.images())
    point = predictor.operating_point  # chosen on these specimens in training: its op_* are optimistic
    metrics, details = report(probs, val.labels, val.specimens, val.classes, cfg.aggregate, point)
    mlflow.log_params({"op_rule": describe(point)["rule"], **operating_point_numbers(point)})
    mlflow.log_text(format_report(metrics, val.classes), "report.txt")
    return classification_figures(details, metrics, val.classes), metrics


def curve_history(uri: str, run_id: str, cfg) -> dict[str, list[tuple[int, float]]]:
    """The per-epoch losses and headline validation metrics of a run, for the loss-curves plot."""
    import mlflow

    from trainers.tasks import task_of

    curves = task_of(cfg).curves
    client = mlflow.MlflowClient(uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train_loss") or k in curves]
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def resumed_run(uri: str, run_id: str):
    """(config, experiment name, Ray run name) of the MLflow run `run_id` started by platform.train."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from trainers.config import config_class, from_dict

    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--resume: no MLflow run '{run_id}' in {uri}") from None
    name = run.data.tags.get(RAY_NAME_TAG)
    if name is None:
        raise UserError(
            f"--resume: run '{run_id}' was not started by platform.train (no '{RAY_NAME_TAG}' tag)"
        )
    if run.info.status == "FINISHED":
        raise UserError(f"--resume: run '{run_id}' has already finished")
    config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    experiment = client.get_experiment(run.info.experiment_id).name
    return from_dict(config_class(config), config, f"run {run_id} config.json"), experiment, name


def seed_summary(metrics: list[dict]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (n - 1, as the papers' "mean +- std over N runs") of every
    result metric the runs share."""
    keys = sorted(set.intersection(*(set(m) for m in metrics)) - NOT_RESULTS)
    return {
        k: (statistics.fmean(m[k] for m in metrics), statistics.stdev(m[k] for m in metrics)) for k in keys
    }


def format_seed_table(summary: dict[str, tuple[float, float]], runs: int) -> str:
    lines = [f"{'metric':24s} mean +- std over {runs} seeds"]
    lines += [f"{k:24s} {mean:.4f} +- {std:.4f}" for k, (mean, std) in summary.items()]
    return "\n".join(lines)


def check_args(args) -> None:
    """The flags' own mistakes, before anything is read or started; a storage URI is checked here too (a
    bucket that is missing or out of reach: one line, before Ray starts)."""
    for flag, value, least in (("--workers", args.workers, 1), ("--seeds", args.seeds, 1)):
        if value < least:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    if args.gpus < 0:
        raise UserError(f"--gpus: expected 0 or more, got {args.gpus}")
    if args.max_failures < -1:
        raise UserError(f"--max-failures: expected -1 (no limit) or more, got {args.max_failures}")
    if args.resume and (args.overrides or args.seeds > 1):
        raise UserError("--resume: a resumed run keeps its config; leave out key=value overrides and --seeds")
    if args.force_champion and not args.register_as:
        raise UserError("--force-champion: needs --register-as NAME")
    if args.storage_path:
        args.storage_path = _cli.storage_path(args.storage_path)


def run_config(args, uri: str):
    """(config, experiment name, run name): a resumed run's own, or the recipe with --data and overrides."""
    if args.resume:
        cfg, experiment, run_name = resumed_run(uri, args.resume)
    else:
        cfg = _cli.base_config(args.recipe, args.data, args.overrides)
        experiment = args.experiment or Path(args.recipe).stem
        run_name = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Checked before MLflow is touched: a first use creates the store, which logs to stderr.
    if cfg.amp == "fp16" and args.gpus == 0:
        raise UserError("amp: 'fp16' needs GPUs (--gpus); on CPU use amp=off or amp=bf16")
    if getattr(cfg, "norm", "") == "sync_bn" and args.workers > 1 and args.gpus == 0:
        raise UserError("norm: sync_bn needs GPU workers (--gpus); on CPU use norm=group")
    return cfg, experiment, run_name


def train_seeds(cfg, args, uri: str, experiment_id: str, run_name: str, task) -> Outcome:
    """--seeds N: one nested run per seed under a parent run that holds the mean and std over the seeds;
    the best seed's outcome."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as parent:
        mlflow.set_tags({"recipe": args.recipe, "seeds": args.seeds})
        outcomes = [
            train_run(
                apply_overrides(cfg, {"seed": cfg.seed + i}, "--seeds"),
                args,
                uri,
                experiment_id,
                f"{run_name}-seed{cfg.seed + i}",
                parent_run_id=parent.info.run_id,
            )
            for i in range(args.seeds)
        ]
        summary = seed_summary([o.metrics for o in outcomes])
        mlflow.log_metrics(
            {
                f"{k}_{stat}": v
                for k, (mean, std) in summary.items()
                for stat, v in (("mean", mean), ("std", std))
            }
        )
        table = format_seed_table(summary, len(outcomes))
        mlflow.log_text(table, "seeds.txt")
    console.say(table)
    best = max(outcomes, key=lambda o: o.metrics.get(task.metric, 0.0))
    console.say(
        f"best seed: {best.cfg.seed} ({task.metric}={best.metrics.get(task.metric, 0.0):.4f}), "
        f"run {best.run_id}"
    )
    if best.baseline:  # on the best seed's own validation images (the split follows the seed)
        console.say(versus_baseline(best))
    return best


def register_outcome(outcome: Outcome, name: str, metric: str, force: bool) -> str:
    """Register the run's logged model under `name` by the champion rule; the line that says what happened
    (both numbers when there is a champion)."""
    from deploy.champion import register_candidate

    if metric not in outcome.metrics:
        raise UserError(
            f"--register-as: run {outcome.run_id} reported no {metric} to compare with the champion"
        )
    # The model handed over is the run's best epoch (restore_best): its own number, not the last epoch's
    value = outcome.metrics.get(f"best_{metric}", outcome.metrics[metric])
    # The task's metric is maximised (trainers/tasks.py), by platform.tune's default --mode as well.
    registration = register_candidate(outcome.model_uri, name, outcome.cfg, metric, "max", value, force=force)
    return registration.message(metric, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainers.recipes import RECIPES

    if args.list_recipes:
        for name, (_, description) in sorted(RECIPES.items()):
            print(f"{name:20s} {description}")
        return 0
    check_args(args)
    uri = _cli.tracking_uri(args.tracking_uri)
    cfg, experiment, run_name = run_config(args, uri)
    experiment_id = _cli.use_experiment(uri, experiment)

    from trainers.ray_seam import init_ray
    from trainers.tasks import task_of

    task = task_of(cfg)
    started = time.time()
    with console.quiet(_cli.log_file(args.storage_path or str(_cli.LOCAL_RESULTS), run_name), args.verbose):
        init_ray(args.address, str(_cli.REPO))
        if args.seeds == 1:
            best = train_run(cfg, args, uri, experiment_id, run_name, run_id=args.resume)
        else:
            best = train_seeds(cfg, args, uri, experiment_id, run_name, task)
        registered = None
        if args.register_as:
            registered = register_outcome(best, args.register_as, task.metric, args.force_champion)
    if args.seeds == 1:
        shown = "  ".join(f"{k}={best.metrics[k]:.4f}" for k in task.headline if k in best.metrics)
        if "best_epoch" in best.metrics:  # a classifier hands over its lowest-val_loss epoch
            shown += f"  (model of epoch {best.metrics['best_epoch']:.0f})"
        print("final: " + shown)
        if best.baseline:
            print(versus_baseline(best))
    print(f"MLflow: experiment '{experiment}', run {best.run_id}; model {best.model_uri}")
    if registered:
        print(registered)
    print(f"browse: {_cli.browse_hint(uri)}")
    print(f"wall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    _cli.run(main)
