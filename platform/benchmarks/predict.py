"""Benchmark of batch prediction (`python -m platform.bench predict`): images/s and peak RSS of
`platform.predict`'s path (deploy/batch.py: read, predict, resolve overlaps, measure, write label images,
records and tables) against the same model called directly in a loop (read + predict_image only), on a
folder of 256 px sample images and on one large mosaic. Each side runs in its own process, so each peak
RSS is its own."""

import json
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
from PIL import Image

from platform.benchmarks.tiled import SAMPLE_IMAGES, peak_rss_mib, sample_mosaic


def make_checkpoint(folder: Path, recipe: str) -> Path:
    """A checkpoint of `recipe`'s model with random weights (what is measured is the path, not accuracy)."""
    import torch

    from datasets.mask_folders import CATEGORIES
    from trainers.detection.model import build_model
    from trainers.detection.train import save_checkpoint
    from trainers.recipes import get_recipe

    cfg = get_recipe(recipe)
    cfg.weights = ""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_checkpoint(folder, cfg, build_model(cfg, num_classes=len(CATEGORIES)), CATEGORIES, {})
    return folder


def make_images(folder: Path, count: int, mosaic: int) -> tuple[list[Path], Path]:
    """`count` sample images (cycled, 256 px) in folder/small, one mosaic x mosaic image in folder/large."""
    sources = sorted(SAMPLE_IMAGES.glob("*/images/*.png"))
    (folder / "small").mkdir(parents=True)
    small = []
    for k in range(count):
        path = folder / "small" / f"{k:04d}.png"
        path.write_bytes(sources[k % len(sources)].read_bytes())
        small.append(path)
    (folder / "large").mkdir()
    large = folder / "large" / "mosaic.png"
    Image.fromarray(sample_mosaic(mosaic)).save(large)
    return small, large


def batch_side(checkpoint: str, files: list[str], out: str) -> tuple[float, float, int]:
    """platform.predict's path, with its outputs."""
    from deploy.batch import predict_images

    args = Namespace(model=checkpoint, device="cpu", tta=None, page=None, channel=None, pixel_size=None,
                     diameter=None, score_threshold=None, overlays=False)  # fmt: skip
    started = time.perf_counter()
    batch = predict_images(args, Path(checkpoint), [Path(f) for f in files], Path(out))
    objects = sum(len(r["objects"]) for r in batch.records)
    return time.perf_counter() - started, peak_rss_mib(), objects


def direct_side(checkpoint: str, files: list[str], out: str) -> tuple[float, float, int]:
    """The same model called in a loop: read the image, predict_image, its operating point, nothing
    written."""
    from datasets.records import open_image
    from deploy.registry import load_detector, own_mode, reported
    from trainers.detection.inference import predict_image

    detector = load_detector(checkpoint, "cpu")
    started = time.perf_counter()
    objects = 0
    for f in files:
        results = predict_image(detector.model, open_image(Path(f)), "cpu", **own_mode(detector))
        objects += len(reported(results, detector.config))
    return time.perf_counter() - started, peak_rss_mib(), objects


SIDES = {"platform.predict": batch_side, "direct loop": direct_side}


def _run(side: str, checkpoint: Path, files: list[Path], out: Path) -> tuple[float, float, int]:
    """One side in a fresh `python -m platform.benchmarks.predict` process (its own peak RSS), run from the
    repo root like every CLI (DESIGN.md: the `platform` name)."""
    repo = Path(__file__).resolve().parents[2]
    out.mkdir(parents=True)  # as platform.predict's output_folder makes it
    argv = [sys.executable, "-m", "platform.benchmarks.predict", side, str(checkpoint), str(out)]
    argv += [str(f) for f in files]
    done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def benchmark_predict(recipe: str, images: int, mosaic: int, rounds: int) -> list[dict]:
    """Both sides on both inputs, interleaved over `rounds`; prints and returns one row per side and input
    (median seconds of the rounds)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = make_checkpoint(root / "checkpoint", recipe)
        small, large = make_images(root / "images", images, mosaic)
        for label, files, pixels in (("folder", small, 256 * 256), ("mosaic", [large], mosaic * mosaic)):
            times: dict[str, list] = {name: [] for name in SIDES}
            for r in range(rounds):
                for k, name in enumerate(SIDES):
                    times[name].append(_run(name, checkpoint, files, root / f"out-{label}-{r}-{k}"))
            for name, results in times.items():
                seconds = float(np.median([t for t, _, _ in results]))
                rows.append({
                    "input": f"{label}: {len(files)} x {int(pixels**0.5)} px", "side": name,
                    "images_per_s": len(files) / seconds, "s_per_MP": seconds / (len(files) * pixels / 1e6),
                    "peak_rss_MB": max(m for _, m, _ in results), "objects": results[0][2],
                })  # fmt: skip
    print(f"{'input':24s} {'side':18s} {'images/s':>9s} {'s/MP':>7s} {'peak RSS MB':>12s} {'objects':>8s}")
    for row in rows:
        print(f"{row['input']:24s} {row['side']:18s} {row['images_per_s']:9.2f} {row['s_per_MP']:7.2f} "
              f"{row['peak_rss_MB']:12.0f} {row['objects']:8d}")  # fmt: skip
    return rows


if __name__ == "__main__":  # one side, in its own process: SIDE CHECKPOINT OUT FILE...
    side, checkpoint, out, *files = sys.argv[1:]
    print(json.dumps(SIDES[side](checkpoint, files, out)))
