"""Batch prediction of a scientist's files (`python -m platform.predict`): every image through the one
inference path of the registered detector, its objects as a label image and measured (datasets/measure.py),
or every volume / slice image through the registered classifier.

Each image's outputs are written atomically and its record (`parts/<name>.json`: objects, COCO annotations,
seconds) last, so a run that stops (Ctrl-C, a crash, a full disk) is resumed by starting it again: images
with a record are skipped, and a run with another model or other settings is refused (parts/started.json).
The tables, COCO file, plot and run record are rebuilt from the records at the end, also on a resumed run.
Objects overlapping in the model's output (Mask R-CNN masks may) are resolved best score first, as a label
image must; the table, the COCO file and the label image then hold the same objects, numbered alike.
"""

import csv
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.segmentation import relabel_sequential

from datasets.errors import UserError
from datasets.label_images import labels_from_rles, rles_from_labels, write_label_image
from datasets.measure import measure_objects
from datasets.microscopy import BadImage, read_image
from datasets.progress import Progress
from datasets.records import write_bytes_atomic, write_json_atomic, write_text_atomic
from trainers.plots import batch_summary, label_overlay

log = logging.getLogger("datasets.predict")  # shown by the CLIs' progress handler on "datasets"
PARTS = "parts"
DOUBLE_SUFFIXES = (".nii.gz", ".ome.tif", ".ome.tiff")  # dropped whole from output names
MAX_OVERLAY_IDS = 400  # objects numbered on an overlay at most: beyond that the numbers hide the image
STARTED = "started.json"  # in parts/: the model and settings its records were made with
RESUME_IGNORES = ("device",)  # a run may resume on a GPU: the same results, to rounding


@dataclass(frozen=True)
class Failure:
    file: str
    reason: str


@dataclass(frozen=True)
class Batch:
    """What a batch did: the model, every image's (or volume's) record, the files that failed."""

    model: dict
    records: list[dict]
    failures: list[Failure]
    files: int


def output_names(files: list[Path]) -> list[str]:
    """A unique output name per input file: its path below the files' common folder, without the suffix,
    "/" as "__" (plate1/A01.tif and plate2/A01.tif stay apart)."""
    root = Path(os.path.commonpath([f.parent for f in files]))
    names = []
    for f in files:
        relative = f.relative_to(root).as_posix()
        double = next((d for d in DOUBLE_SUFFIXES if relative.lower().endswith(d)), None)
        stem = relative[: -len(double)] if double else relative.rsplit(".", 1)[0]
        names.append(stem.replace("/", "__"))
    return names


def check_resumable(out: Path, model: dict, settings: dict) -> None:
    """A run on an --out that holds results already must continue with the same model and the settings
    that shape its results (cut-off, TTA, pixel size, page, ...): one table mixing two would be wrong. The
    first run records them in parts/started.json before its first image (a run stopped before its end
    writes no run.json); an --out from before that record is checked against its run.json. While no image
    has a record, another run's settings replace the earlier ones."""
    wanted = json.loads(json.dumps({"model": {"ref": model["ref"], "version": model["version"]},
                                    "settings": settings}))  # fmt: skip
    record = out / PARTS / STARTED
    started = read_run_settings(record)
    earlier = started or read_run_settings(out / "run.json")
    if earlier is not None and not any(p.name != STARTED for p in (out / PARTS).glob("*.json")):
        # no image has results yet (every file failed, e.g. with a wrong --channel): nothing to mix
        log.info(f"--out: {out} holds no image's results yet: this run's settings replace the earlier ones")
        earlier = started = None
    if earlier is not None:
        before, now = earlier["model"], wanted["model"]
        if (before.get("ref"), before.get("version")) != (now["ref"], now["version"]):
            raise UserError(
                f"--out: {out} holds results of {before.get('ref')} (version {before.get('version')}), not "
                f"of {now['ref']} (version {now['version']}); choose another --out"
            )
        keys = sorted({*earlier["settings"], *wanted["settings"]} - set(RESUME_IGNORES))
        changed = [k for k in keys if earlier["settings"].get(k) != wanted["settings"].get(k)]
        if changed:
            made = ", ".join(f"{k} {earlier['settings'].get(k)}" for k in changed)
            asked = ", ".join(f"{k} {wanted['settings'].get(k)}" for k in changed)
            raise UserError(
                f"--out: {out} holds results made with {made}; this run asks for {asked}. Repeat the "
                "earlier settings to finish it, or choose another --out"
            )
    if started is None:  # none yet, or an unreadable one
        (out / PARTS).mkdir(exist_ok=True)
        write_json_atomic(record, wanted)


def read_run_settings(path: Path) -> dict | None:
    """The {"model", "settings"} of a started.json or run.json; None when there is none or it cannot be
    read (an unreadable one is replaced)."""
    try:
        earlier = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning(f"{path} cannot be read ({e}): replaced")
        return None
    if isinstance(earlier, dict) and all(isinstance(earlier.get(k), dict) for k in ("model", "settings")):
        return earlier
    log.warning(f"{path} is not a record of a predict run: replaced")
    return None


def model_record(ref: str) -> dict:
    """What run.json says about the model: the --model given, and for a registered one its name, version
    and MLflow run."""
    from deploy.registry import registry_version

    name, version = registry_version(ref)
    run_id = None
    if name is not None:
        import mlflow

        run_id = mlflow.MlflowClient().get_model_version(name, version).run_id
    return {"ref": ref, "name": name, "version": version, "run_id": run_id}


def software() -> dict:
    import mlflow
    import skimage
    import torch
    import torchvision

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "mlflow": mlflow.__version__,
        "scikit-image": skimage.__version__,
    }


def run_images(files: list[Path], out: Path, process, what: str) -> tuple[list[dict], list[Failure]]:
    """`process(path, name) -> record` for every file without a record in out/parts (written atomically
    there); a BadImage or UserError of one file is reported and skipped. Returns all records, in file
    order (resumed ones read back), and the failures."""
    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    names = output_names(files)
    records, failures = [], []
    todo = [(f, n) for f, n in zip(files, names, strict=True) if not (parts / f"{n}.json").is_file()]
    if len(todo) < len(files):
        log.info(f"{len(files) - len(todo)} of {len(files)} {what} done in an earlier run: skipped")
    done = {}
    with Progress(len(todo), "predicted", what, log.info, every_s=10.0) as bar:
        for path, name in todo:
            try:
                record = process(path, name)
                write_json_atomic(parts / f"{name}.json", record)
                done[name] = record
            except (BadImage, UserError) as e:
                failures.append(Failure(str(path), str(e)))
                log.warning(f"skipped {path}: {e}")
            bar.update(status=f"{len(failures)} failed" if failures else "")
    for name in names:  # this run's records as they are, an earlier run's read back
        part = parts / f"{name}.json"
        if name in done or part.is_file():
            records.append(done[name] if name in done else json.loads(part.read_text()))
    return records, failures


def detect_one(detector, path: Path, name: str, out: Path, args) -> dict:
    """One image: predicted, overlaps resolved (best score first), measured; its label image (and overlay)
    written; its record returned."""
    from deploy.registry import own_mode, reported
    from trainers.detection.inference import predict_image

    image = read_image(path, args.page, args.channel)
    pixels, pixel_size = image.pixels, args.pixel_size or image.pixel_size_um
    started = time.perf_counter()
    results = predict_image(
        detector.model, pixels, detector.device, object_diameter=args.diameter, **own_mode(detector)
    )
    results = sorted(reported(results, detector.config, args.score_threshold), key=lambda r: -r["score"])
    height, width = pixels.shape[:2]
    painted = labels_from_rles([r["segmentation"] for r in results], height, width)
    # objects the better ones covered entirely are gone: numbers 1..N without gaps, as tools expect
    labels, _, original = relabel_sequential(painted)
    seconds = time.perf_counter() - started
    names = {c["id"]: c["name"] for c in detector.categories}
    rles = dict(rles_from_labels(labels))  # every object's RLE in one pass over the label image
    objects, annotations = [], []
    for row in measure_objects(labels, pixels, pixel_size):
        k = row["object_id"]
        result = results[int(original[k]) - 1]
        objects.append(
            {"image": name, "class": names[result["category_id"]], "score": result["score"], **row}
        )
        x0, y0, x1, y1 = row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]
        annotations.append(
            {"id": k, "category_id": result["category_id"], "score": result["score"], "segmentation": rles[k],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": row["area_px"], "iscrowd": 0}
        )  # fmt: skip
    write_label_image(out / "labels" / f"{name}.tif", labels)
    if args.overlays:
        classes = [a["category_id"] for a in annotations]  # in label order
        write_overlay(out / "overlays" / f"{name}.png", pixels, labels, classes, detector.categories)
    return {
        "image": name, "file": str(path), "height": height, "width": width, "pixel_size_um": pixel_size,
        "seconds": round(seconds, 3), "objects": objects, "annotations": annotations,
    }  # fmt: skip


def load_for_batch(folder: Path, args):
    """The detector of `folder` on --device, with --tta in place of its own."""
    from deploy.registry import load_detector, set_tta

    detector = load_detector(str(folder), args.device)
    if args.tta is not None:
        set_tta(detector, args.tta)
    return detector


def predict_images(args, folder: Path, files: list[Path], out: Path) -> Batch:
    """platform.predict for a detector: every image of `files` into `out`."""
    model = model_record(args.model)
    detector = load_for_batch(folder, args)
    cfg, classes = detector.config, [c["name"] for c in detector.categories]
    settings = {
        "tile_size": cfg.tile_size, "tta": cfg.tta if args.tta is None else args.tta,
        "object_diameter": cfg.object_diameter if args.diameter is None else args.diameter,
        "score_threshold": args.score_threshold if args.score_threshold is not None else cfg.score_threshold,
        "normalize": cfg.normalize, "pixel_size_um": args.pixel_size, "page": args.page,
        "channel": args.channel, "device": str(detector.device), "classes": classes,
    }  # fmt: skip
    check_resumable(out, model, settings)
    (out / "labels").mkdir(exist_ok=True)
    if args.overlays:
        (out / "overlays").mkdir(exist_ok=True)
    started = time.perf_counter()
    records, failures = run_images(
        files, out, lambda path, name: detect_one(detector, path, name, out, args), "images"
    )
    write_detector_tables(out, records, detector.categories)
    write_run_record(out, model, settings, records, failures, time.perf_counter() - started)
    objects = sum(len(r["objects"]) for r in records)
    print(
        f"{len(records)} images, {objects} objects -> {out} (objects.csv, counts.csv, labels/, summary.png)"
    )
    return Batch(model, records, failures, len(files))


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def object_columns(records: list[dict]) -> list[str]:
    """objects.csv's columns: image, class, score, then the measurements in the order measure_objects gives
    them; the micrometre ones when any image has a pixel size (empty for those without)."""
    columns: dict[str, None] = {"image": None, "object_id": None, "class": None, "score": None}
    for record in records:
        for row in record["objects"]:
            columns.update(dict.fromkeys(row))
    return list(columns)


def count_rows(records: list[dict], classes: list[str]) -> list[dict]:
    """Objects per image and class, a total per image and a last row of totals."""
    rows = []
    for record in records:
        row = {"image": record["image"], **dict.fromkeys(classes, 0)}
        for obj in record["objects"]:
            row[obj["class"]] += 1
        row["total"] = len(record["objects"])
        rows.append(row)
    totals = {"image": "total", **{k: sum(r[k] for r in rows) for k in [*classes, "total"]}}
    return [*rows, totals]


def coco_file(records: list[dict], categories: list[dict]) -> dict:
    """COCO instances of all images (ids 1..N in file order; `name`: the image's name in labels/ and the
    tables), annotations numbered across the file, each with its score and `object_id` (its number in the
    label image): pycocotools reads it as a dataset, CVAT imports it."""
    images, annotations = [], []
    for index, record in enumerate(records, start=1):
        images.append(
            {
                "id": index,
                "file_name": record["file"],
                "height": record["height"],
                "width": record["width"],
                "name": record["image"],
            }  # fmt: skip
        )
        for annotation in record["annotations"]:
            annotations.append(
                {**annotation, "id": len(annotations) + 1, "image_id": index, "object_id": annotation["id"]}
            )
    cats = [{"id": c["id"], "name": c["name"]} for c in categories]
    return {"images": images, "annotations": annotations, "categories": cats}


def write_detector_tables(out: Path, records: list[dict], categories: list[dict]) -> None:
    """objects.csv, counts.csv, predictions.json and summary.png from the per-image records."""
    classes = [c["name"] for c in categories]
    objects = [obj for record in records for obj in record["objects"]]
    write_text_atomic(out / "objects.csv", csv_text(objects, object_columns(records)))
    counts = count_rows(records, classes)
    write_text_atomic(out / "counts.csv", csv_text(counts, ["image", *classes, "total"]))
    write_json_atomic(out / "predictions.json", coco_file(records, categories))

    micrometres = bool(objects) and all(r["pixel_size_um"] for r in records)
    key, unit = ("equivalent_diameter_um", "µm") if micrometres else ("equivalent_diameter_px", "pixels")
    totals = counts[-1]
    figure = batch_summary({c: totals[c] for c in classes}, [o[key] for o in objects], unit,
                           f"{len(records)} images, {totals['total']} objects")  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(out / "summary.png", buffer.getvalue())


def write_overlay(path: Path, pixels, labels, label_classes: list[int], categories) -> None:
    """overlays/<image>.png: the image (percentile-stretched for display) with each object outlined in its
    class colour and numbered as in objects.csv (up to MAX_OVERLAY_IDS objects)."""
    from PIL import Image

    from datasets.normalize import normalize
    from trainers.plots import class_colours

    palette = class_colours(categories)
    colours = [palette[c][:3] for c in label_classes]  # label k's class is label_classes[k - 1]
    drawn = label_overlay(normalize(pixels, "percentile"), labels, colours, len(colours) <= MAX_OVERLAY_IDS)
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_run_record(out, model, settings, records, failures, seconds: float) -> None:
    """run.json: the model, the settings, the software, each image's seconds and the failures."""
    write_json_atomic(
        out / "run.json",
        {
            "model": model,
            "settings": settings,
            "software": software(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds_this_run": round(seconds, 1),
            "images": [{"image": r["image"], "file": r["file"], "seconds": r["seconds"]} for r in records],
            "failed": [{"file": f.file, "reason": f.reason} for f in failures],
        },
        indent=1,
    )


def report_failures(failures: list[Failure], total: int) -> int:
    """Print the files that could not be predicted, with their reasons: exit code 1 when there are any."""
    if not failures:
        return 0
    print(f"{len(failures)} of {total} files failed and were skipped:", file=sys.stderr)
    for f in failures:
        print(f"  {f.file}: {f.reason}", file=sys.stderr)
    return 1


def classify_one(predictor, path: Path, name: str, top_k: int) -> dict:
    """One NIfTI volume (sliced as in training, slices aggregated) or slice image: its top-k classes and the
    decision at the model's operating point."""
    from trainers.classification.model import classify_volume
    from trainers.classification.operating_point import decide

    started = time.perf_counter()
    if path.name.lower().endswith((".nii", ".nii.gz")):
        from datasets.volumes import load_volume

        kept, _, probs = classify_volume(predictor, load_volume(path))
        slices = len(kept)
    else:
        from datasets.records import to_rgb8

        probs, slices = predictor.predict_proba([to_rgb8(read_image(path).pixels)])[0], 1
    order = np.argsort(-probs)[:top_k]
    decided = int(decide(probs[None, :], predictor.operating_point)[0])
    return {
        "image": name, "file": str(path), "slices": slices, "predicted": predictor.classes[decided],
        "top": [[predictor.classes[i], float(probs[i])] for i in order],
        "seconds": round(time.perf_counter() - started, 3),
    }  # fmt: skip


def classify_files(args, folder: Path, files: list[Path], out: Path) -> Batch:
    """platform.predict for a classifier: predictions.csv (a row per file) and run.json in `out`."""
    from deploy.registry import load_classifier
    from trainers.classification.operating_point import describe

    model = model_record(args.model)
    predictor = load_classifier(str(folder), args.device)
    settings = {"decision": describe(predictor.operating_point), "classes": list(predictor.classes),
                "top_k": args.top_k, "aggregate": predictor.aggregate}  # fmt: skip
    check_resumable(out, model, settings)
    started = time.perf_counter()
    records, failures = run_images(
        files, out, lambda path, name: classify_one(predictor, path, name, args.top_k), "files"
    )
    rows = []
    for r in records:
        row = {"file": r["file"], "predicted": r["predicted"], "slices": r["slices"]}
        for rank, (cls, p) in enumerate(r["top"], start=1):
            row.update({f"class_{rank}": cls, f"probability_{rank}": f"{p:.6f}"})
        rows.append(row)
    ranks = [f"{k}_{rank}" for rank in range(1, args.top_k + 1) for k in ("class", "probability")]
    write_text_atomic(out / "predictions.csv", csv_text(rows, ["file", "predicted", "slices", *ranks]))
    write_run_record(out, model, settings, records, failures, time.perf_counter() - started)
    print(f"{len(records)} files classified -> {out / 'predictions.csv'}")
    return Batch(model, records, failures, len(files))
