"""Benchmark of exported models (`python -m platform.bench export`): milliseconds per image of the same
random-weight detector and slice classifier in PyTorch eager, as TorchScript (libtorch) and as ONNX (ONNX
Runtime, CPU), on the same inputs: 256 px sample images for the detector (the tiles of the dsb2018_cpu
recipe it is built from), slices of a sample adrenal3d volume for the classifier (adrenal3d_cpu), one image
per call. The sides take turns image by image, their order rotated every round, so that a drift of the
machine hits all of them alike; one warm-up call per side is not timed."""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from datasets.records import load_image
from datasets.slices import to_tensor
from datasets.volumes import load_volume
from deploy.export import ClassifierGraph, DetectorGraph, export_model, load_exported
from platform.benchmarks.predict import make_checkpoint
from platform.benchmarks.tiled import SAMPLE_IMAGES
from trainers.classification.model import kept_slices, load_classifier_checkpoint, normalisation
from trainers.detection.inference import image_tensor
from trainers.detection.model import load_checkpoint_model

DETECTOR_RECIPE, CLASSIFIER_RECIPE = "dsb2018_cpu", "adrenal3d_cpu"
VOLUMES = SAMPLE_IMAGES.parent / "adrenal3d" / "volumes"


def classifier_checkpoint(folder: Path, recipe: str) -> Path:
    """A checkpoint of `recipe`'s classifier with random weights (what is measured is speed)."""
    from trainers.classification.model import build_classifier, save_classifier
    from trainers.recipes import get_recipe

    cfg = get_recipe(recipe)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_classifier(folder, cfg, build_classifier(cfg, 2).state_dict(), ["normal", "hyperplasia"])
    return folder


def detector_side(root: Path, images: int) -> tuple[torch.nn.Module, list[np.ndarray], Path]:
    """The detector in eager PyTorch, its inputs, and its checkpoint folder."""
    folder = make_checkpoint(root / "detector", DETECTOR_RECIPE)
    model, cfg, _ = load_checkpoint_model(folder)
    paths = sorted(SAMPLE_IMAGES.glob("*/images/*.png"))
    tiles = [load_image(paths[k % len(paths)])[: cfg.tile_size, : cfg.tile_size] for k in range(images)]
    return DetectorGraph(model).eval(), [image_tensor(t, cfg.normalize).numpy() for t in tiles], folder


def classifier_side(root: Path, images: int) -> tuple[torch.nn.Module, list[np.ndarray], Path]:
    """The classifier in eager PyTorch, its inputs (batches of one slice), and its checkpoint folder."""
    folder = classifier_checkpoint(root / "classifier", CLASSIFIER_RECIPE)
    classifier = load_classifier_checkpoint(folder)
    cfg = classifier.config
    slices = kept_slices(classifier, load_volume(sorted(VOLUMES.glob("*.nii.gz"))[0]))
    step = max(1, len(slices) // images)
    mean, std = normalisation(classifier.model)
    inputs = [
        to_tensor(s.image, cfg.input_size, cfg.in_chans, mean, std)[None].numpy() for s in slices[::step]
    ]
    return ClassifierGraph(classifier.model).eval(), inputs[:images], folder


def time_sides(sides: dict, inputs: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of every call of every side: per round and image, each side in turn."""
    names = list(sides)
    for name in names:
        sides[name](inputs[0])  # warm-up: first-call allocations, ONNX Runtime's graph set-up
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for x in inputs:
            for name in order:
                started = time.perf_counter()
                sides[name](x)
                ms[name].append(1000 * (time.perf_counter() - started))
    return ms


def eager(model: torch.nn.Module):
    """The PyTorch side: the same graph module, called on the same arrays."""

    @torch.inference_mode()
    def run(x: np.ndarray):
        return model(torch.from_numpy(x))

    return run


def benchmark_export(rounds: int, images: int, threads: int) -> list[dict]:
    """Both models on all three sides; prints and returns one row per model and side (median and 90th
    percentile ms per image over rounds x images calls, and the eager median over the side's)."""
    torch.set_num_threads(threads)  # eager and TorchScript; ONNX Runtime gets the same below
    models = {
        f"detector {DETECTOR_RECIPE}": detector_side,
        f"classifier {CLASSIFIER_RECIPE}": classifier_side,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, make in models.items():
            model, inputs, folder = make(root, images)
            sides = {"PyTorch eager": eager(model)}
            for fmt, side in (("torchscript", "TorchScript"), ("onnx", "ONNX Runtime")):
                export_model(folder, fmt, root / f"{folder.name}.{fmt}", str(folder))
                sides[side] = load_exported(root / f"{folder.name}.{fmt}", threads)
            ms = time_sides(sides, inputs, rounds)
            base = float(np.median(ms["PyTorch eager"]))
            for side, values in ms.items():
                median, p90 = float(np.median(values)), float(np.percentile(values, 90))
                rows.append({"model": label, "side": side, "median_ms": median, "p90_ms": p90,
                             "vs_eager": base / median})  # fmt: skip
    print(f"\n{images} images x {rounds} rounds per side, one image per call, {threads} CPU threads")
    print(f"{'model':28s} {'side':14s} {'median ms':>10s} {'p90 ms':>8s} {'speed-up':>9s}")
    for row in rows:
        print(f"{row['model']:28s} {row['side']:14s} {row['median_ms']:10.1f} {row['p90_ms']:8.1f} "
              f"{row['vs_eager']:8.2f}x")  # fmt: skip
    return rows
