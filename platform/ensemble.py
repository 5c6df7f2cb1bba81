"""Combine trained slice classifiers into one model: soft voting, majority voting, or the ForamDeepSlice
PatchEnsemble (the first model patched by the second on the first's weakest classes, with the classes and
the switching confidence chosen on validation specimens only). The ensemble is evaluated beside its
members, logged to MLflow, and registered (alias champion) with --register-as; it then evaluates and
serves like any classifier.

    python -m platform.ensemble --models models:/adrenal-a@champion models:/adrenal-b@champion --method soft
    python -m platform.ensemble --models CKPT_A CKPT_B --method patch --register-as adrenal-patch
    python -m platform.ensemble --models A B C --method vote --data /data/val_volumes/labels.csv
    python -m platform.ensemble --models models:/adrenal@champion --calibrate acc  # one model, tuned cut-off

Validation data: by default the members' own validation specimens (they must share data, split and
slicing, which `split_seed` keeps equal across seeds); or --data, a labelled volume source or slice index.
"""

import argparse
import tempfile
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli

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
    p.add_argument("--method", choices=("soft", "vote", "patch"), default="soft")
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
    p.add_argument("--register-as", help="register the ensemble under this name, alias champion")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.method == "patch" and len(args.models) != 2:
        raise UserError(f"--method patch: expected two --models (primary, secondary), got {len(args.models)}")
    if args.method != "patch" and len(args.models) < 2 and not args.calibrate:
        raise UserError("--models: an ensemble needs two or more models (or one with --calibrate)")
    if args.out and Path(args.out).exists():
        raise UserError(f"--out: {args.out} already exists (choose a new folder)")
    uri = _cli.tracking_uri(args.tracking_uri)
    experiment_id = _cli.use_experiment(uri, args.experiment)

    import mlflow

    from deploy.registry import classifier_folder, log_classifier, register
    from trainers.classification.ensemble import (
        Ensemble,
        combine,
        fit_class_weights,
        fit_patch,
        load_predictor,
        save_ensemble,
    )
    from trainers.classification.metrics import format_report, report
    from trainers.classification.model import SliceClassifier
    from trainers.plots import classification_figures, log_figure

    folders = [classifier_folder(m) for m in args.models]
    members = [load_predictor(f) for f in folders]
    for value, m in zip(args.models, members, strict=True):
        if not isinstance(m, SliceClassifier):
            raise UserError(f"--models: {value} is itself an ensemble; give its member models instead")
    ensemble = Ensemble(args.method, members)  # checks classes and slicing agree
    started = time.time()
    member_probs, groups, labels = validation_predictions(members, args.data)
    classes = ensemble.classes
    method = ensemble.aggregate
    if args.method == "patch":
        ensemble.patch_classes, ensemble.threshold, f1 = fit_patch(
            member_probs[0], member_probs[1], labels, classes, groups, method
        )
        patched = ", ".join(ensemble.patch_classes) or "none (the primary alone scored best)"
        print(f"patch: classes {patched}, threshold {ensemble.threshold:.2f}, validation volume F1 {f1:.4f}")
    if args.calibrate:
        combined = combine(ensemble, member_probs)
        ensemble.class_weights, value = fit_class_weights(
            combined, labels, classes, groups, method, args.calibrate
        )
        shown = ", ".join(f"{c} x{w:g}" for c, w in zip(classes, ensemble.class_weights, strict=True))
        print(f"class weights: {shown} (validation volume {args.calibrate} {value:.4f})")
    probs = combine(ensemble, member_probs)
    metrics, details = report(probs, labels, groups, classes, method)
    rows = [("ensemble", metrics)]
    for value, p in zip(args.models, member_probs, strict=True):
        rows.append((value, report(p, labels, groups, classes, method)[0]))
    keys = ("slice_acc", "slice_auc", "volume_acc", "volume_auc", "volume_f1")
    width = max(len(name) for name, _ in rows)
    print(f"{len(set(groups))} validation specimens, {len(labels)} slices")
    print(f"{'model':{width}s}  " + "  ".join(f"{k:>10s}" for k in keys))
    for name, m in rows:
        print(f"{name:{width}s}  " + "  ".join(f"{m.get(k, float('nan')):10.4f}" for k in keys))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_ensemble(Path(args.out) if args.out else Path(tmp) / "ensemble", ensemble, folders)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"{args.method}-ensemble-{time.strftime('%Y%m%d-%H%M%S')}"
        ) as run:
            mlflow.log_params(
                {
                    "method": args.method,
                    "members": " ".join(args.models),
                    "patch_classes": ",".join(ensemble.patch_classes),
                    "threshold": ensemble.threshold,
                    "class_weights": ",".join(map(str, ensemble.class_weights)),
                    "validation": args.data or "members' validation split",
                }
            )
            mlflow.log_metrics(metrics)
            for i, (_, m) in enumerate(rows[1:]):
                mlflow.log_metrics({f"member{i}_{k}": m[k] for k in keys})
            mlflow.log_text(format_report(metrics, classes), "report.txt")
            for name, fig in classification_figures(details, metrics, classes).items():
                log_figure(fig, name)
            info = log_classifier(folder)
    version = register(info.model_uri, args.register_as) if args.register_as else None
    if args.out:
        print(f"ensemble folder: {folder}")
    print(f"MLflow: experiment '{args.experiment}', run {run.info.run_id}; model {info.model_uri}")
    if version is not None:
        print(f"registered model: name={version.name} version={version.version} alias=champion")
    print(f"wall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    _cli.run(main)
