"""Predict a folder of images with a registered model and measure every object: label images, COCO
predictions, a table of objects (in micrometres when the pixel size is known), counts per image and class,
a summary plot and a record of the run. A classifier writes its top classes per volume or slice image.

    python -m platform.predict --model models:/nuclei@champion /data/plate1 --out results/plate1
    python -m platform.predict --model models:/nuclei@champion "/d/*.tif" --out r --pixel-size 0.65
    python -m platform.predict --model models:/forams@champion /data/stack.ome.tif --page 3 --out r --overlays
    python -m platform.predict --model models:/adrenal@champion /data/ct/*.nii.gz --out results/ct

Inputs: files, folders (searched recursively, sorted) and globs. Detector: PNG, JPEG, BMP, TIFF/OME-TIFF
(8/16-bit, multi-channel with --channel, stacks with --page), large images tiled as the model was trained.
Classifier: NIfTI volumes (.nii, .nii.gz), or slice images.

--out holds, for a detector (each image's files written atomically; a run started again on the same --out
with the same model and settings skips the images it finished, and with others is refused):
  labels/<image>.tif    uint16 label images, 0 = background, k = object k (napari, Cellpose, QuPath)
  predictions.json      COCO instances (images, categories, annotations with scores): pycocotools, CVAT
  objects.csv           one row per object: class, score, area, perimeter, diameters, axes, shape, mean
                        intensity, centroid, box; in pixels, and in micrometres when the pixel size is known
  counts.csv            objects per image and class, with totals
  summary.png           counts per class and the size distribution
  overlays/<image>.png  with --overlays: outlines in class colours, numbered as in objects.csv
  run.json              model (name, version, run), settings, software versions, per-image seconds
A classifier writes predictions.csv (one row per file: top classes and probabilities, the decision) and
run.json. A file that cannot be read is reported with its reason and skipped (exit code 1 at the end);
a mistake in the command (no such model, no images, --out not writable) is one `error:` line (exit 2).
"""

import argparse
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli

# torch, MLflow and the model code are imported inside the functions that use them: --help answers at once.

DESCRIPTION = __doc__.split("\n\n")[0]
VOLUME_SUFFIXES = (".nii", ".nii.gz")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.predict",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("inputs", nargs="+", help="image or volume files, folders (recursive) or globs")
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, or a folder")
    p.add_argument("--out", required=True, help="output folder (created; a finished image is not redone)")
    p.add_argument("--pixel-size", type=float, help="micrometres per pixel (default: the file's metadata)")
    p.add_argument("--page", type=int, help="TIFF stacks: the plane to predict (0-based, over Z/T/pages)")
    p.add_argument("--channel", type=int, help="multi-channel images: the channel to predict (0-based)")
    p.add_argument(
        "--tta", help="detector test-time augmentation: off, flips, flips+rot90 (default: model's)"
    )
    p.add_argument("--diameter", type=float, help="detector: shrink every image whose objects look larger "
                   "than this many pixels (default: the model's object_diameter; 0 = never)")  # fmt: skip
    p.add_argument("--score-threshold", type=float, help="detector: report the objects scoring at least "
                   "this (default: the model's operating point, chosen on validation)")  # fmt: skip
    p.add_argument("--overlays", action="store_true", help="detector: also draw overlays/<image>.png")
    p.add_argument("--top-k", type=int, default=3, help="classifier: classes per row (default 3)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--mlflow", action="store_true", help="log the run (counts, tables, summary) to MLflow")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or .mlflow/)")
    p.add_argument("--experiment", default="predict", help="MLflow experiment (default predict)")
    return p


def check_args(args) -> None:
    if args.pixel_size is not None and not (args.pixel_size > 0 and args.pixel_size < float("inf")):
        raise UserError(f"--pixel-size: expected micrometres per pixel > 0, got {args.pixel_size}")
    for flag in ("page", "channel"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UserError(f"--{flag}: expected 0 or more, got {value}")
    if args.score_threshold is not None and not 0 <= args.score_threshold <= 1:
        raise UserError(f"--score-threshold: expected a score in [0, 1], got {args.score_threshold}")
    if args.top_k < 1:
        raise UserError(f"--top-k: expected 1 or more, got {args.top_k}")
    if args.diameter is not None and not 0 <= args.diameter < float("inf"):
        raise UserError(f"--diameter: expected 0 (never shrink) or pixels, got {args.diameter}")
    if args.device not in (None, "cpu", "cuda"):
        raise UserError(f"--device: expected cuda or cpu, got {args.device}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to this process")
    _cli.check_tta(args.tta)


def output_folder(value: str) -> Path:
    """--out, created and checked writable before any model is loaded or image read."""
    out = Path(value).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: {out} is not a writable folder ({e.strerror or e})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the progress lines
    check_args(args)
    folder = _cli.model_folder(args.model, args.tracking_uri)
    from datasets.microscopy import find_images
    from datasets.records import IMAGE_SUFFIXES
    from deploy.batch import classify_files, predict_images, report_failures
    from trainers.classification.ensemble import is_classifier_folder

    classifier = is_classifier_folder(folder)
    files = find_images(args.inputs, IMAGE_SUFFIXES + VOLUME_SUFFIXES if classifier else IMAGE_SUFFIXES)
    # --out inside an input folder: its label images and overlays are outputs, never inputs of a rerun
    out = Path(args.out).expanduser().resolve()
    files = [f for f in files if not f.is_relative_to(out)]
    if not files:
        raise UserError(f"{' '.join(args.inputs)}: no input files outside --out {args.out}")
    if classifier:
        batch = classify_files(args, folder, files, output_folder(args.out))
    else:
        batch = predict_images(args, folder, files, output_folder(args.out))
    if args.mlflow:
        log_batch(args, Path(args.out), batch)
    return report_failures(batch.failures, batch.files)


def log_batch(args, out: Path, batch) -> None:
    """--mlflow: one run with the counts and timing as metrics, the tables and plot as artifacts, tagged
    with the model version."""
    import mlflow
    import numpy as np

    uri = _cli.tracking_uri(args.tracking_uri)
    model = batch.model
    run_name = f"predict-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=_cli.use_experiment(uri, args.experiment), run_name=run_name) as run:
        tags = {"model": model["ref"], "model_name": model["name"], "model_version": model["version"]}
        mlflow.set_tags({k: str(v) for k, v in {**tags, "model_run_id": model["run_id"]}.items()})
        mlflow.log_params({"inputs": " ".join(args.inputs)[:500], "out": str(out.resolve())})
        metrics = {"images": len(batch.records), "failed": len(batch.failures)}
        if batch.records and "objects" in batch.records[0]:
            metrics["objects"] = sum(len(r["objects"]) for r in batch.records)
        if batch.records:
            metrics["s_per_image"] = float(np.mean([r["seconds"] for r in batch.records]))
        mlflow.log_metrics(metrics)
        for name in ("objects.csv", "counts.csv", "predictions.csv", "summary.png", "run.json"):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name))
    print(f"MLflow: experiment '{args.experiment}', run {run.info.run_id}")


if __name__ == "__main__":
    _cli.run(main)
