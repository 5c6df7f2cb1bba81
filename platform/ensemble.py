"""Combine trained models into one: slice classifiers by soft voting, majority voting, or the ForamDeepSlice
PatchEnsemble (the first model patched by the second on the first's weakest classes, with the classes and
the switching confidence chosen on validation specimens only); Mask R-CNNs by mask vote (--method
mask-vote: instances matched by mask IoU, a pixel kept where at least half the members have it, score the
members' mean; trainers/detection/combine.py), optionally under test-time augmentation (--tta). The
ensemble is evaluated beside its members, logged to MLflow, and registered with --register-as (alias
champion only if it beats the current champion on the same validation data: volume AUC, or segm AP, or
with --force-champion); it then evaluates and serves like any classifier or detector.

    python -m platform.ensemble --models models:/adrenal-a@champion models:/adrenal-b@champion --method soft
    python -m platform.ensemble --models CKPT_A CKPT_B --method patch --register-as adrenal-patch
    python -m platform.ensemble --models A B C --method vote --data /data/val_volumes/labels.csv
    python -m platform.ensemble --models models:/adrenal@champion --calibrate acc  # one model, tuned cut-off
    python -m platform.ensemble --models models:/nuclei-a@champion CKPT_B CKPT_C --method mask-vote \
        --register-as nuclei-ens

Validation data: by default the members' own validation specimens (they must share data, split and
slicing, which `split_seed` keeps equal across seeds); or --data, a labelled volume source or slice index.
Detectors: the members' own validation images (they must share data, split and seed; no --data yet), and
the same input normalisation, tile size and categories.
"""

import argparse
import tempfile
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli
from trainers.config import TTA_MODES

# torch, ray, MLflow and the model code are imported inside the functions that use them: --help and a
# mistyped flag answer at once.

DESCRIPTION = __doc__.split("\n\n")[0]
SPLIT_FIELDS = (
    "data",
    "val_fraction",
    "split_seed",
    "axes",
    "slice_size",
    "crop",
    "crop_margin",
    "context",
    "distance_scale",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.ensemble",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models", nargs="+", required=True, help="checkpoint folders or MLflow URIs (patch: primary first)"
    )
    p.add_argument(
        "--method",
        choices=("soft", "vote", "patch", "mask-vote"),
        default="soft",
        help="classifiers: soft, vote or patch (default soft); Mask R-CNNs: mask-vote",
    )
    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="mask-vote: test-time augmentation of the whole ensemble (default: the first member's tta)",
    )
    p.add_argument(
        "--calibrate",
        choices=("acc", "f1"),
        help="also choose per-class probability weights on validation that maximise volume accuracy or "
        "macro F1 (an operating point for imbalanced classes; allows a single --models)",
    )
    p.add_argument(
        "--data", help="validation volumes or slice index (default: the members' validation split)"
    )
    p.add_argument("--out", help="also keep the ensemble folder here (it is logged to MLflow in any case)")
    p.add_argument(
        "--register-as",
        help="register the ensemble under this name; alias champion only if it beats the current champion "
        "on the same validation specimens",
    )
    p.add_argument(
        "--force-champion",
        action="store_true",
        help="with --register-as: point alias champion at the ensemble even if it does not beat the champion",
    )
    p.add_argument("--experiment", default="ensembles", help="MLflow experiment (default ensembles)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or .mlflow/ here)"
    )
    return p


def validation_predictions(members, data: str | None):
    """(N x C probabilities of each member, specimen of each slice, label of each slice) on the
    validation data."""
    from datasets.volumes import read_volumes
    from trainers.classification.model import predict_volumes
    from trainers.classification.train import slice_sets
    from trainers.config import to_dict

    if data is None:
        first = to_dict(members[0].config)
        for m in members[1:]:
            differ = [k for k in SPLIT_FIELDS if to_dict(m.config)[k] != first[k]]
            if differ:
                raise UserError(
                    f"--models: members were validated on different data ({', '.join(differ)} differ); "
                    "give common validation data with --data"
                )
        _, val, _ = slice_sets(members[0].config)
        images = val.images()
        return [m.predict_proba(images) for m in members], val.specimens, val.labels
    records = read_volumes(data)
    runs = [predict_volumes(m, records) for m in members]
    return [r[0] for r in runs], runs[0][1], runs[0][2]


KEYS = ("slice_acc", "slice_auc", "volume_acc", "volume_auc", "volume_f1")  # the printed table's columns


def check_args(args) -> None:
    if args.method == "mask-vote":
        check_detector_args(args)
    elif args.tta:
        raise UserError("--tta: test-time augmentation is for detector ensembles (--method mask-vote)")
    if args.method == "patch" and len(args.models) != 2:
        raise UserError(f"--method patch: expected two --models (primary, secondary), got {len(args.models)}")
    if args.method not in ("patch", "mask-vote") and len(args.models) < 2 and not args.calibrate:
        raise UserError("--models: an ensemble needs two or more models (or one with --calibrate)")
    if args.out and Path(args.out).exists():
        raise UserError(f"--out: {args.out} already exists (choose a new folder)")
    if args.force_champion and not args.register_as:
        raise UserError("--force-champion: needs --register-as NAME")


def load_members(models: list[str]):
    """(local folder, loaded classifier) of every --models value; an ensemble is not a member."""
    from deploy.registry import classifier_folder
    from trainers.classification.ensemble import load_predictor
    from trainers.classification.model import SliceClassifier

    folders = [classifier_folder(m, "--models") for m in models]
    members = [load_predictor(f) for f in folders]
    for value, m in zip(models, members, strict=True):
        if not isinstance(m, SliceClassifier):
            raise UserError(f"--models: {value} is itself an ensemble; give its member models instead")
    return folders, members


def fit(ensemble, member_probs, labels, groups, calibrate: str | None) -> None:
    """The patch rule's classes and threshold, and --calibrate's class weights, chosen on validation."""
    from trainers.classification.ensemble import combine, fit_class_weights, fit_patch
    from trainers.classification.metrics import aggregate
    from trainers.classification.operating_point import explain, fit_operating_point

    classes, method = ensemble.classes, ensemble.aggregate
    if ensemble.method == "patch":
        ensemble.patch_classes, ensemble.threshold, f1 = fit_patch(
            member_probs[0], member_probs[1], labels, classes, groups, method
        )
        patched = ", ".join(ensemble.patch_classes) or "none (the primary alone scored best)"
        print(f"patch: classes {patched}, threshold {ensemble.threshold:.2f}, validation volume F1 {f1:.4f}")
    if calibrate:
        combined = combine(ensemble, member_probs)
        ensemble.class_weights, value = fit_class_weights(
            combined, labels, classes, groups, method, calibrate
        )
        shown = ", ".join(f"{c} x{w:g}" for c, w in zip(classes, ensemble.class_weights, strict=True))
        print(f"class weights: {shown} (validation volume {calibrate} {value:.4f})")
    # The decision on the combined volume probabilities, chosen on the same validation volumes, as a
    # trained classifier's (trainers/classification/operating_point.py)
    import numpy as np  # numpy only where an ensemble is fitted: the CLI's --help stays fast

    ids, volume_probs = aggregate(combine(ensemble, member_probs), groups, method)
    label_of = dict(zip(groups, labels, strict=True))  # every slice of a specimen has its label
    volume_labels = np.array([label_of[i] for i in ids])
    ensemble.operating_point = fit_operating_point(volume_probs, volume_labels, classes)
    print(f"operating point: {explain(ensemble.operating_point)}")


def print_table(rows: list[tuple[str, dict]], groups, labels) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"{len(set(groups))} validation specimens, {len(labels)} slices")
    print(f"{'model':{width}s}  " + "  ".join(f"{k:>10s}" for k in KEYS))
    for name, m in rows:
        print(f"{name:{width}s}  " + "  ".join(f"{m.get(k, float('nan')):10.4f}" for k in KEYS))


def log_ensemble(args, experiment_id: str, folder: Path, ensemble, rows, details):
    """One MLflow run: the ensemble's settings, its and its members' metrics, report, figures and model."""
    import mlflow

    from deploy.registry import log_classifier
    from trainers.classification.metrics import format_report, operating_point_numbers
    from trainers.classification.operating_point import describe
    from trainers.plots import classification_figures, log_figure

    metrics = rows[0][1]
    run_name = f"{args.method}-ensemble-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(
            {
                "method": args.method,
                "members": " ".join(args.models),
                "patch_classes": ",".join(ensemble.patch_classes),
                "threshold": ensemble.threshold,
                "class_weights": ",".join(map(str, ensemble.class_weights)),
                "validation": args.data or "members' validation split",
                "op_rule": describe(ensemble.operating_point)["rule"],
                **operating_point_numbers(ensemble.operating_point),
            }
        )
        mlflow.log_metrics(metrics)
        for i, (_, m) in enumerate(rows[1:]):
            mlflow.log_metrics({f"member{i}_{k}": m[k] for k in KEYS})
        mlflow.log_text(format_report(metrics, ensemble.classes), "report.txt")
        for name, fig in classification_figures(details, metrics, ensemble.classes).items():
            log_figure(fig, name)
        return run.info.run_id, log_classifier(folder).model_uri


def register_ensemble(model_uri: str, metrics: dict, members, args) -> str:
    """Register the logged ensemble by the champion rule, measured as a classifier task is (its metric on
    the validation specimens the table shows); the line that says what happened."""
    from datasets.volumes import read_volumes
    from deploy.champion import config_validation, register_candidate, volume_validation
    from trainers.tasks import task_of

    metric = task_of(members[0].config).metric
    if metric not in metrics:
        raise UserError(f"--register-as: the ensemble has no {metric} on its validation data to compare")
    if args.data is None:
        validation = config_validation(members[0].config)
    else:
        validation = volume_validation(read_volumes(args.data))
    value = metrics[metric]
    registration = register_candidate(
        model_uri, args.register_as, validation, metric, "max", value, force=args.force_champion
    )
    return registration.message(metric, value)


DETECTOR_KEYS = ("segm_AP", "segm_AP50", "bbox_AP", "kaggle_mAP")  # the detector table's columns


def check_detector_args(args) -> None:
    if len(args.models) < 2:
        raise UserError("--models: a mask-vote ensemble needs two or more Mask R-CNNs")
    if args.calibrate:
        raise UserError("--calibrate: for classifiers; a mask-vote ensemble has no class cut-offs")
    if args.data:
        raise UserError(
            "--data: a detector ensemble is measured on its members' own validation images (shared data, "
            "val_fraction and seed or split_file); --data is for classifier ensembles"
        )


def detector_folders(models: list[str]) -> list[Path]:
    """The local checkpoint folder of every --models value; classifiers and ensembles are not members."""
    from deploy.registry import resolve
    from trainers.classification.ensemble import is_classifier_folder
    from trainers.detection.combine import is_ensemble_folder

    folders = []
    for value in models:
        folder = resolve(value, "--models")
        if is_classifier_folder(folder):
            raise UserError(
                f"--models: {value} is a slice classifier; --method mask-vote combines Mask R-CNNs"
            )
        if is_ensemble_folder(folder):
            raise UserError(f"--models: {value} is itself an ensemble; give its member models instead")
        folders.append(folder)
    return folders


def shared_validation(folders: list[Path], models: list[str]):
    """The first member's config (the ensemble's), once the members are known to share their input
    (normalize, tile_size, categories) and their validation images."""
    from deploy.champion import validation_fingerprint
    from trainers.detection.combine import check_folders

    configs = check_folders(folders, models)
    first = validation_fingerprint(configs[0])
    for value, cfg in zip(models[1:], configs[1:], strict=True):
        if validation_fingerprint(cfg) != first:
            raise UserError(
                f"--models: {models[0]} and {value} were validated on different images (their data, "
                "val_fraction, seed or split_file differ): train the members with one split_file to "
                "measure their ensemble on images none of them trained on"
            )
    return configs[0]


def evaluate_detectors(folder: Path, folders: list[Path], models: list[str], cfg) -> list[tuple[str, dict]]:
    """(name, validation metrics) of the ensemble, then of each member, each loaded as it would serve."""
    from deploy.champion import evaluate_model

    rows = [("ensemble", evaluate_model(str(folder), cfg))]
    for value, member in zip(models, folders, strict=True):
        rows.append((value, evaluate_model(str(member), cfg)))
    return rows


def print_detector_table(rows: list[tuple[str, dict]], tta: str) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"mask-vote ensemble of {len(rows) - 1} Mask R-CNNs, tta {tta}, on the members' validation images")
    print(f"{'model':{width}s}  " + "  ".join(f"{k:>10s}" for k in DETECTOR_KEYS))
    for name, m in rows:
        print(f"{name:{width}s}  " + "  ".join(f"{m.get(k, float('nan')):10.4f}" for k in DETECTOR_KEYS))
    key = DETECTOR_KEYS[0]
    best_name, best = max(rows[1:], key=lambda row: row[1].get(key, float("-inf")))
    ours = rows[0][1].get(key, float("nan"))
    print(f"ensemble vs best member ({best_name}): {key} {ours:.4f} vs {best.get(key, float('nan')):.4f}")


def log_detector_ensemble(args, experiment_id: str, folder: Path, rows, tta: str) -> tuple[str, str]:
    """One MLflow run: the ensemble's settings, its validation metrics and its members', and the model."""
    import mlflow

    from deploy.registry import log_checkpoint

    run_name = f"mask-vote-ensemble-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(
            {
                "method": args.method,
                "members": " ".join(args.models),
                "tta": tta,
                "validation": "members' validation split",
            }
        )
        mlflow.log_metrics(rows[0][1])
        for i, (_, m) in enumerate(rows[1:]):
            mlflow.log_metrics({f"member{i}_{k}": m[k] for k in DETECTOR_KEYS if k in m})
        return run.info.run_id, log_checkpoint(folder).model_uri


def register_detector_ensemble(model_uri: str, metrics: dict, cfg, args) -> str:
    """Register the logged ensemble by the champion rule, on the members' validation images (a detector's
    metric, as a training run registers); the line that says what happened."""
    from deploy.champion import config_validation, register_candidate
    from trainers.tasks import task_of

    metric = task_of(cfg).metric
    if metric not in metrics:
        raise UserError(f"--register-as: the ensemble has no {metric} on its validation data to compare")
    value = metrics[metric]
    registration = register_candidate(
        model_uri, args.register_as, config_validation(cfg), metric, "max", value, force=args.force_champion
    )
    return registration.message(metric, value)


def main_detectors(args, experiment_id: str) -> int:
    """--method mask-vote: build, measure, log and register a detector ensemble."""
    from trainers.detection.combine import save_ensemble

    started = time.time()
    folders = detector_folders(args.models)
    cfg = shared_validation(folders, args.models)
    tta = args.tta or cfg.tta
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_ensemble(
            Path(args.out) if args.out else Path(tmp) / "ensemble", folders, args.method, tta
        )
        rows = evaluate_detectors(folder, folders, args.models, cfg)
        print_detector_table(rows, tta)
        run_id, model_uri = log_detector_ensemble(args, experiment_id, folder, rows, tta)
    registered = register_detector_ensemble(model_uri, rows[0][1], cfg, args) if args.register_as else None
    print_outcome(args, folder, run_id, model_uri, registered, started)
    return 0


def print_outcome(args, folder: Path, run_id: str, model_uri: str, registered: str | None, started: float):
    if args.out:
        print(f"ensemble folder: {folder}")
    print(f"MLflow: experiment '{args.experiment}', run {run_id}; model {model_uri}")
    if registered:
        print(registered)
    print(f"wall time: {time.time() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    uri = _cli.tracking_uri(args.tracking_uri)
    experiment_id = _cli.use_experiment(uri, args.experiment)
    if args.method == "mask-vote":
        return main_detectors(args, experiment_id)

    from trainers.classification.ensemble import Ensemble, combine, save_ensemble
    from trainers.classification.metrics import report

    folders, members = load_members(args.models)
    ensemble = Ensemble(args.method, members)  # checks classes and slicing agree
    started = time.time()
    member_probs, groups, labels = validation_predictions(members, args.data)
    fit(ensemble, member_probs, labels, groups, args.calibrate)
    classes, method = ensemble.classes, ensemble.aggregate
    point = ensemble.operating_point
    metrics, details = report(combine(ensemble, member_probs), labels, groups, classes, method, point)
    rows = [("ensemble", metrics)]
    for value, p in zip(args.models, member_probs, strict=True):
        rows.append((value, report(p, labels, groups, classes, method)[0]))
    print_table(rows, groups, labels)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_ensemble(Path(args.out) if args.out else Path(tmp) / "ensemble", ensemble, folders)
        run_id, model_uri = log_ensemble(args, experiment_id, folder, ensemble, rows, details)
    registered = register_ensemble(model_uri, metrics, members, args) if args.register_as else None
    print_outcome(args, folder, run_id, model_uri, registered, started)
    return 0


if __name__ == "__main__":
    _cli.run(main)
