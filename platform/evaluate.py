"""Evaluate a trained Mask R-CNN on a dataset: COCO bbox/segm metrics (per class, per IoU threshold, at a
chosen max detections, optionally without one class), the Kaggle DSB2018/Sartorius metric and the mean
matched mask IoU, as a table, beside the classical baseline's (the model config's `baseline`: Otsu
threshold + connected components on the same images); per image: objects, predictions, AP, Kaggle score and
TP/FP/FN, the worst images drawn with their errors outlined; metrics, tables and plots go to an MLflow run.
A slice classifier or ensemble is evaluated on labelled volumes (sliced as in its training) or a slice
index, at slice and volume level.

    python -m platform.evaluate --model .ray_results/RUN/checkpoint_000009 --data datasets/sample/dsb2018
    python -m platform.evaluate --model models:/demo@champion --data /data/dsb --predictions-out /tmp/r.json
    python -m platform.evaluate --model models:/demo@champion --data /data/dsb --tta flips \
        --per-image-out /tmp/per_image.csv --worst 8
    python -m platform.evaluate --model runs:/RUN_ID/model --data /data/foram --data-format via \\
        --split-file splits/foram.json --split val --max-dets 256 --exclude-class sediment

    python -m platform.evaluate --model models:/adrenal@champion --data /data/adrenal_test/labels.csv
    python -m platform.evaluate --model ENSEMBLE_FOLDER --data slices/index.csv --split test

--model is a checkpoint, classifier or ensemble folder, or an MLflow model URI. With --predictions-out
R.json the predictions are written as COCO results, and the ground truth they are scored against as
R.gt.json beside them, so that any COCO tool can re-score them; for a classifier, --predictions-out R.csv
gets one row per volume (label, prediction, class probabilities).
"""

import argparse
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli

# torch, ray, MLflow and the model code are imported inside the functions that use them: --help and a
# mistyped flag answer at once.

DESCRIPTION = __doc__.split("\n\n")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.evaluate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="checkpoint folder, or models:/NAME@alias, runs:/RUN_ID/model, ..."
    )
    p.add_argument("--data", required=True, help="dataset folder or annotation file")
    p.add_argument(
        "--data-format",
        help="coco, via, mask-folders, rle-csv or label-images (default: guessed from --data)",
    )
    p.add_argument("--split-file", help="split JSON (python -m platform.data split): evaluate one split")
    p.add_argument("--split", default="val", help="the split of --split-file to evaluate (default val)")
    p.add_argument(
        "--max-dets",
        type=int,
        help="max detections per image, for the model and for COCO AP/AR (default: the model's own)",
    )
    p.add_argument(
        "--tile-size",
        type=int,
        help="tiled inference at native resolution with tiles of this many pixels; 0 = whole images "
        "(default: the model's training mode, its tile_size)",
    )
    p.add_argument(
        "--tile-overlap", type=int, help="pixels shared by neighbouring tiles (default: the model's)"
    )
    p.add_argument("--exclude-class", help="also report every metric without this class, e.g. sediment")
    p.add_argument("--predictions-out", help="write COCO results JSON here (and the ground truth beside it)")
    p.add_argument(
        "--score-threshold",
        type=float,
        help="predictions scoring below this are left out of the Kaggle metric and the overlays (default: "
        "the model's operating point, chosen on its validation images in training)",
    )
    p.add_argument(
        "--tta",
        help="detector test-time augmentation: off, flips or flips+rot90 (default: the model's own tta)",
    )
    p.add_argument(
        "--worst",
        type=int,
        default=6,
        help="detector: print and draw this many images of lowest Kaggle score (default 6; 0 = none)",
    )
    p.add_argument("--per-image-out", help="detector: write the per-image table (CSV) here")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or .mlflow/ here)"
    )
    p.add_argument("--experiment", default="evaluate", help="MLflow experiment (default evaluate)")
    p.add_argument("--no-mlflow", action="store_true", help="print only; log nothing to MLflow")
    return p


def category_map(model_categories, data_categories) -> dict[int, int]:
    """The model's label ids -> the data's category ids, matched by class name."""
    data_ids = {c["name"]: c["id"] for c in data_categories}
    missing = [c["name"] for c in model_categories if c["name"] not in data_ids]
    if missing:
        raise UserError(
            f"--data: the model predicts {', '.join(c['name'] for c in model_categories)} but the data has "
            f"{', '.join(data_ids)} (no {', '.join(missing)})"
        )
    return {c["id"]: data_ids[c["name"]] for c in model_categories}


def read_data(args) -> list:
    from datasets.instances import guess_format, read_records
    from datasets.splits import apply_split, read_split

    if not Path(args.data).exists():
        raise UserError(f"--data: {args.data} not found")
    records = read_records(args.data, args.data_format or guess_format(args.data))
    if args.split_file:
        split = read_split(args.split_file, (args.split,))
        records = apply_split(records, split, args.split_file)[args.split]
    elif args.split != "val":
        raise UserError("--split: needs --split-file")
    if not records:
        raise UserError(f"--split-file: split '{args.split}' of {args.split_file} is empty")
    return records


def log_run(
    uri: str, experiment: str, params: dict, metrics: dict, table: str, figures: dict, files, texts=None
) -> str:
    """One MLflow run: the arguments as params, every metric, the table, the figures, written files and
    `texts` (artifact name -> text, e.g. a CSV)."""
    import mlflow

    from trainers.plots import log_figure

    run_name = f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=_cli.use_experiment(uri, experiment), run_name=run_name) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_text(table + "\n", "metrics.txt")
        for name, fig in figures.items():
            log_figure(fig, name)
        for path in files:
            mlflow.log_artifact(str(path), "predictions")
        for name, text in (texts or {}).items():
            mlflow.log_text(text, name)
    return run.info.run_id


def classifier_data(args, predictor):
    """(slice probabilities, specimen per slice, label per slice) of --data: labelled volumes, sliced as
    the model's training slices were, or a slice index (rows of --split when its split column is set)."""
    import numpy as np

    from datasets.slice_index import read_index
    from datasets.slices import SliceDataset, is_slice_index
    from datasets.volumes import read_volumes
    from trainers.classification.model import predict_volumes

    path = Path(args.data).expanduser().resolve()
    if not path.exists():
        raise UserError(f"--data: {args.data} not found")
    if not is_slice_index(path):
        return predict_volumes(predictor, read_volumes(path))
    index = path / "index.csv" if path.is_dir() else path
    rows = read_index(index)
    if any(r["split"] for r in rows):
        rows = [r for r in rows if r["split"] == args.split]
        if not rows:
            raise UserError(f"--split: no slices of split '{args.split}' in {index}")
    unknown = sorted({r["label"] for r in rows} - set(predictor.classes))
    if unknown:
        raise UserError(f"--data: {index} has labels {', '.join(unknown)} the model does not predict")
    dataset = SliceDataset(rows, index.parent, predictor.classes, input_size=0, in_chans=3)
    return predictor.predict_proba(dataset.images()), dataset.specimens, np.asarray(dataset.labels)


def evaluate_classifier(args, uri: str | None, folder: Path) -> int:
    from deploy.registry import load_classifier
    from trainers.classification.metrics import format_report, operating_point_numbers, report
    from trainers.classification.operating_point import decide, describe, explain
    from trainers.plots import classification_figures

    predictor = load_classifier(str(folder))
    started = time.perf_counter()
    probs, groups, labels = classifier_data(args, predictor)
    predict_s = time.perf_counter() - started
    classes, point = predictor.classes, predictor.operating_point
    # argmax rows always; op_* rows at the model's own operating point, when it has one
    metrics, details = report(probs, labels, groups, classes, predictor.aggregate, point)
    table = format_report(metrics, classes)
    print(f"{len(set(groups))} volumes, {len(labels)} slices; volume = {predictor.aggregate} of its slices")
    print(f"decision: {explain(point)}")
    print(table)
    print(f"predict {predict_s:.1f} s")
    files = []
    if args.predictions_out:
        from datasets.records import write_text_atomic

        volume = details["volume"]
        predicted = decide(volume["probs"], point)  # the model's decision: at its operating point
        lines = [",".join(["specimen", "label", "predicted", *(f"p_{c}" for c in classes)])]
        for i, p, y, k in zip(volume["ids"], volume["probs"], volume["labels"], predicted, strict=True):
            lines.append(",".join([i, classes[y], classes[k], *(f"{v:.6f}" for v in p)]))
        files = [Path(args.predictions_out)]
        write_text_atomic(files[0], "\n".join(lines) + "\n")
        print(f"predictions: {files[0]} (one row per volume)")
    if not args.no_mlflow:
        params = {"model": args.model, "data": str(Path(args.data).resolve()), "volumes": len(set(groups))}
        # the decision rule as params: op_rule (argmax, cut-off, class weights), op_class, its numbers
        params.update(op_rule=describe(point)["rule"], **operating_point_numbers(point))
        if point is not None and point.positive:
            params["op_class"] = point.positive
        figures = classification_figures(details, metrics, classes)
        run_id = log_run(uri, args.experiment, params, metrics, table, figures, files)
        print(f"MLflow: experiment '{args.experiment}', run {run_id}")
        print(f"browse: {_cli.browse_hint(uri)}")
    return 0


def predict_detections(args, folder: Path, records: list) -> tuple[list, dict, float]:
    """COCO results of the detector in `folder` on `records`, category ids the data's; the settings they
    were predicted with (max_dets, tile_size, tta, the config's classical baseline, the operating point
    the Kaggle metric counts at) and the seconds predicting took (without loading)."""
    from deploy.registry import load_detector, own_mode, set_tta
    from trainers.detection.inference import predict_records

    detector = load_detector(str(folder))
    tta = detector.config.tta
    if args.tta is not None:  # in place of the model's own (load_detector applied that already)
        set_tta(detector, args.tta)
        tta = args.tta
    model = detector.model
    ids = category_map(detector.categories, records[0].categories)
    if args.max_dets is not None:
        model.roi_heads.detections_per_img = args.max_dets  # the foram paper: 100 in training, 256 at test
    mode = own_mode(detector)  # and the model's inference filters (class_score_thresh, mask_min_area)
    for key in ("tile_size", "tile_overlap"):
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    started = time.perf_counter()
    results = predict_records(model, records, detector.device, **mode)
    settings = {
        "max_dets": model.roi_heads.detections_per_img,
        "tile_size": mode["tile_size"],
        "tta": tta,
        "baseline": detector.config.baseline,
        "score_threshold": detector.config.score_threshold
        if args.score_threshold is None
        else args.score_threshold,
    }
    for r in results:
        r["category_id"] = ids[r["category_id"]]
    return results, settings, time.perf_counter() - started


def baseline_report(method: str, records: list, gt, max_dets: int) -> dict[str, float]:
    """The classical baseline's metrics on the evaluated images (trainers/detection/baseline.py), scored
    as the model is; {} for baseline=off. Shown beside the model, never a model itself."""
    if method == "off":
        return {}
    from trainers.detection.baseline import baseline_metrics

    return baseline_metrics(records, method, max_dets, gt)


def error_analysis(
    args, gt, records: list, results: list, max_dets: int, cut: float
) -> tuple[list, str, dict]:
    """The per-image table (rows), the printed table of the --worst images, and their overlay figure (TP
    green, FP red, FN yellow outlines) by artifact name; the CSV goes to --per-image-out."""
    from datasets.records import load_image, write_text_atomic
    from trainers.evaluation import (
        ERROR_IOU,
        image_outcomes,
        per_image_table,
        rows_csv,
        rows_table,
        worst_rows,
    )
    from trainers.plots import error_overlays

    outcomes = image_outcomes(gt, results, cut)
    rows = per_image_table(gt, results, outcomes, max_dets)
    if args.per_image_out:
        write_text_atomic(args.per_image_out, rows_csv(rows))
        print(f"per-image table: {args.per_image_out}")
    worst = worst_rows(rows, args.worst)
    if not worst:
        return rows, "", {}
    text = (
        f"worst {len(worst)} of {len(rows)} images by Kaggle score (TP/FP/FN at IoU > {ERROR_IOU}, "
        f"predictions scoring >= {cut}):\n{rows_table(worst)}"
    )
    figure = error_overlays(
        [load_image(records[r["image_id"] - 1].image_path) for r in worst],
        [outcomes[r["image_id"] - 1] for r in worst],  # outcomes follow gt's ids 1..N, as rows do
        [f"{r['image'][:16]}  Kaggle {r['kaggle']:.3f}" for r in worst],
    )
    return rows, text, {"plots/worst_images.png": figure}


def detector_params(args, settings: dict, images: int) -> dict:
    return {
        "model": args.model,
        "data": str(Path(args.data).resolve()),
        "split": f"{args.split_file}:{args.split}" if args.split_file else "all images",
        **settings,
        "exclude_class": args.exclude_class or "",
        "images": images,
    }


def evaluate_detector(args, uri: str | None, folder: Path) -> int:
    from datasets.instances import InstanceDataset, coco_ground_truth
    from datasets.records import write_json_atomic
    from trainers.evaluation import (
        category_ids_without,
        coco_report,
        format_comparison,
        format_table,
        kaggle_metrics,
        rows_csv,
    )
    from trainers.plots import evaluation_figures

    # Everything about the input is checked before the model runs: a mistake costs seconds, not a pass.
    records = read_data(args)
    if args.exclude_class:
        category_ids_without(records[0].categories, args.exclude_class)
    gt = coco_ground_truth(InstanceDataset(records))
    results, settings, predict_s = predict_detections(args, folder, records)
    files = []
    if args.predictions_out:
        files = [Path(args.predictions_out), Path(args.predictions_out).with_suffix(".gt.json")]
        write_json_atomic(files[0], results)
        write_json_atomic(files[1], gt.dataset)
        print(f"predictions: {files[0]} (COCO results), ground truth: {files[1]}")

    started = time.perf_counter()
    max_dets, method, cut = settings["max_dets"], settings["baseline"], settings["score_threshold"]
    metrics, evals = coco_report(gt, results, max_dets, args.exclude_class)
    metrics.update(kaggle_metrics(gt, results, cut))
    baseline = baseline_report(method, records, gt, max_dets)
    rows, worst, figures = error_analysis(args, gt, records, results, max_dets, cut)
    tables = [format_table(metrics)]
    if baseline:
        compared = format_comparison({"model": metrics, f"baseline ({method})": baseline})
        tables.append(f"the model beside the classical baseline on the same images:\n{compared}")
    table = "\n\n".join([*tables, *([worst] if worst else [])])
    print(
        f"{len(records)} images, {len(gt.anns)} ground-truth instances, {len(results)} predictions; "
        f"max {max_dets} detections per image; Kaggle metric at score >= {cut}"
    )
    print(table)
    print(f"predict {predict_s:.1f} s, evaluate {time.perf_counter() - started:.1f} s")
    if not args.no_mlflow:
        figures.update(evaluation_figures(evals, records, results, cut))
        logged = {**metrics, **{f"baseline_{k}": v for k, v in baseline.items()}}
        params = detector_params(args, settings, len(records))
        texts = {"per_image.csv": rows_csv(rows)}
        run_id = log_run(uri, args.experiment, params, logged, table, figures, files, texts)
        print(f"MLflow: experiment '{args.experiment}', run {run_id}")
        print(f"browse: {_cli.browse_hint(uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the progress lines
    if args.max_dets is not None and args.max_dets < 1:
        raise UserError(f"--max-dets: expected a positive integer, got {args.max_dets}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise UserError(f"--score-threshold: expected a value in [0, 1], got {args.score_threshold}")
    _cli.check_tta(args.tta)
    if args.worst < 0:
        raise UserError(f"--worst: expected 0 or more images, got {args.worst}")
    uri = None
    if not args.no_mlflow or ":/" in args.model:
        import mlflow

        uri = _cli.tracking_uri(args.tracking_uri)
        mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the registry at this URI
        mlflow.set_registry_uri(uri)

    from deploy.registry import resolve
    from trainers.classification.ensemble import is_classifier_folder

    folder = resolve(args.model)
    if is_classifier_folder(folder):
        return evaluate_classifier(args, uri, folder)
    return evaluate_detector(args, uri, folder)


if __name__ == "__main__":
    _cli.run(main)
