"""Model quality on images no model trained on (`python -m platform.bench quality`): the CPU recipe(s)
trained in a plain process within their stated budget, then scored beside the classical baselines, with
and without test-time augmentation, and as a mask-vote ensemble of the seeds.

The validation set is DESIGN.md's ("Measuring model quality"): the images of ../shared/data/dsb2018 that
are not in the bundled sample the recipes train on, each model in its own inference mode (tiled at its
tile size, its normalisation and filters), through the one inference path.
"""

import json
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from datasets.errors import UserError
from datasets.instances import SAMPLE_DATA, InstanceDataset, coco_ground_truth, read_records
from datasets.progress import Progress
from trainers.config import apply_overrides, parse_overrides, to_dict
from trainers.detection.baseline import METHODS, baseline_metrics
from trainers.detection.combine import (
    MaskVoteEnsemble,
    ensemble_config,
    load_detector_model,
    with_tta,
)
from trainers.detection.inference import predict_records
from trainers.evaluation import score_results
from trainers.recipes import get_recipe

SHARED_DSB2018 = Path(__file__).resolve().parents[3] / "shared" / "data" / "dsb2018" / "stage1_train"
SHOWN = ("segm_AP", "kaggle_mAP", "segm_AP50", "bbox_AP")


@dataclass
class Row:
    name: str
    metrics: dict[str, float]
    seconds: float  # predicting (baselines: labelling) the whole set, or training for a "trained" row
    note: str = ""


def validation_records(shared: Path = SHARED_DSB2018, bundled: Path = SAMPLE_DATA) -> list:
    """The DSB2018 images of `shared` whose folders are not in the bundled sample, as image records read
    from a temporary folder of links (the folder lives as long as the process)."""
    if not shared.is_dir():
        raise UserError(f"{shared}: the shared DSB2018 images are not there (see ../shared/data/README.md)")
    seen = {p.name for p in Path(bundled).iterdir()}
    folder = Path(tempfile.mkdtemp(prefix="dsb2018-unseen-"))
    for image in sorted(shared.iterdir()):
        if image.is_dir() and image.name not in seen:
            (folder / image.name).symlink_to(image.resolve())
    return read_records(folder, "mask-folders")


def train_recipe(
    recipe: str, seed: int, overrides: list[str], out: Path, device: str | None = None
) -> tuple[Path, float, list[dict]]:
    """Train `recipe` with `seed` in this process (no Ray) on `device` (default: the GPU if there is one);
    its checkpoint folder (the best epoch), the wall time in seconds and the epochs' reports, each with
    `wall_s`: seconds from the start to the end of that epoch, validation and checkpoint included."""
    from trainers.detection.train import run_training
    from trainers.ray_seam import LocalSeam

    cfg = apply_overrides(get_recipe(recipe), {**parse_overrides(overrides), "seed": seed})
    folder = out / f"{recipe}-seed{seed}"
    started = time.perf_counter()

    def progress(m: dict) -> None:
        wall = m["wall_s"] = time.perf_counter() - started
        eta = wall / m["epoch"] * (cfg.epochs - m["epoch"])
        print(
            f"  {recipe} seed {seed} epoch {m['epoch']}/{cfg.epochs}: loss {m['train_loss']:.3f} "
            f"val segm_AP {m['segm_AP']:.3f} (best {m['best_segm_AP']:.3f} at {m['best_epoch']}) "
            f"{m['train_images_per_s']:.2f} img/s, {wall / 60:.1f} min, ETA {eta / 60:.1f} min",
            flush=True,
        )

    seam = LocalSeam(checkpoint_dir=folder, on_report=progress, device=device)
    run_training(cfg, seam)
    (folder / "run.json").write_text(json.dumps({"config": to_dict(cfg), "reports": seam.reports}) + "\n")
    return folder, time.perf_counter() - started, seam.reports


def score_model(name: str, model, cfg, categories, records, gt, note: str = "", device: str = "cpu") -> Row:
    """A model (on `device`) on `records` in its config's inference mode, scored against `gt`."""
    started = time.perf_counter()
    results = predict_records(
        model,
        records,
        device,
        tile_size=cfg.tile_size,
        tile_overlap=cfg.tile_overlap,
        cfg=cfg,
        categories=categories,
    )
    seconds = time.perf_counter() - started
    return Row(
        name, score_results(gt, results, cfg.box_detections_per_img, cfg.score_threshold), seconds, note
    )


def score_baselines(records, gt, methods: tuple[str, ...] = METHODS) -> list[Row]:
    rows = []
    for method in methods:
        started = time.perf_counter()
        metrics = baseline_metrics(records, method, gt=gt)
        rows.append(Row(f"baseline {method}", metrics, time.perf_counter() - started, "no training"))
    return rows


def plain_model(folder: Path, device: str = "cpu"):
    """load_detector_model's (model, config, categories) without the config's own tta (dsb2018_cpu has
    one): the benchmark's plain rows are the model alone, its tta rows add TTA once."""
    model, cfg, categories = load_detector_model(folder, device)
    return with_tta(model, "off"), cfg, categories


def score_checkpoints(folders: list[Path], records, gt, tta: str, device: str = "cpu") -> list[Row]:
    """Each checkpoint, each with `tta` too, and (several) their mask-vote ensemble, with and without TTA."""
    rows, loaded = [], []
    score = partial(score_model, records=records, gt=gt, device=device)
    for folder in folders:
        model, cfg, categories = plain_model(folder, device)
        loaded.append((model, cfg, categories))
        rows.append(score(folder.name, model, cfg, categories))
        if tta != "off":
            rows.append(score(f"{folder.name} + tta {tta}", with_tta(model, tta), cfg, categories))
    if len(loaded) > 1:
        ensemble = MaskVoteEnsemble(
            [m for m, _, _ in loaded], [c.mask_threshold for _, c, _ in loaded]
        ).eval()
        cfg, categories = ensemble_config([c for _, c, _ in loaded]), loaded[0][2]
        name = f"mask-vote ensemble of {len(loaded)}"
        rows.append(score(name, ensemble, cfg, categories))
        if tta != "off":
            rows.append(score(f"{name} + tta {tta}", with_tta(ensemble, tta), cfg, categories))
    return rows


def format_rows(rows: list[Row]) -> str:
    header = f"{'':40s}" + "".join(f"{k:>12s}" for k in SHOWN) + f"{'seconds':>10s}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row.metrics.get(k, float('nan')):12.4f}" for k in SHOWN)
        lines.append(f"{row.name:40s}{cells}{row.seconds:10.0f}  {row.note}")
    return "\n".join(lines)


def run(
    recipes: list[str], seeds: list[int], checkpoints: list[str], tta: str, overrides, out: Path
) -> list[Row]:
    """Train (unless `checkpoints` are given) and score; prints the table and writes quality.json to `out`."""
    records = validation_records()
    gt = coco_ground_truth(InstanceDataset(records))
    print(f"validation set: {len(records)} DSB2018 images not in the bundled sample ({SHARED_DSB2018})")
    rows = score_baselines(records, gt)
    print(format_rows(rows), flush=True)
    folders = [Path(c) for c in checkpoints]
    if not folders:
        with Progress(len(recipes) * len(seeds), "trained", "runs", print) as bar:
            for recipe in recipes:
                for seed in seeds:
                    folder, seconds, reports = train_recipe(recipe, seed, overrides, out)
                    last = reports[-1]
                    best = f"best epoch {last['best_epoch']:.0f} of {last['epoch']:.0f}"
                    note = f"{best}, segm_AP {last['best_segm_AP']:.3f} on the recipe's validation images"
                    rows.append(Row(f"trained {folder.name}", {}, seconds, note))
                    folders.append(folder)
                    bar.update()
    rows += score_checkpoints(folders, records, gt, tta)
    print(format_rows(rows), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps([row.__dict__ for row in rows], indent=2) + "\n")
    return rows
