"""Benchmark of the data paths (`python -m platform.bench data`): the instance loader's images/s beside
the Mask R-CNN training step's images/s on the same cores (the loader must not be the bottleneck),
volume slicing's slices/s, the peak memory of reading one micro-CT volume, and the tiles/s and memory of
full-resolution training's tiles of a mosaic with thousands of nuclei."""

import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.augment import augmentation, seed_worker
from datasets.instances import (
    SAMPLE_DATA,
    InstanceDataset,
    collate,
    instance_masks,
    read_records,
    tile_instance_masks,
)
from datasets.records import ImageRecord, image_size, load_image
from datasets.slice_index import extract_slices
from datasets.tiles import clip_instances, tile_grid
from datasets.volumes import VolumeRecord, load_volume, read_volumes
from platform.benchmarks.training import train_rate
from trainers.recipes import get_recipe


def loader_benchmark(
    root: str | Path | None = None,
    preset: str = "sartorius",
    passes: int = 2,
    num_workers: int = 0,
    seed: int = 0,
) -> dict:
    """Images/s of the training data path (read PNGs, augment, masks to boxes, tensors) over a
    mask-folders dataset (default: the bundled DSB2018 sample), `passes` times over it.

    The default preset is the heaviest on the bundled sample (measured: sartorius upsamples to a
    640-800 short edge, so every mask is resized too). Returns {"preset", "images", "seconds",
    "images_per_s", "instances_per_s", "num_workers"}. With num_workers=0 it measures one core;
    compare with the model's images/s on the same cores.
    """
    dataset = InstanceDataset(read_records(root or SAMPLE_DATA), augmentation(preset, seed))
    loader = DataLoader(
        dataset, batch_size=1, num_workers=num_workers, collate_fn=collate, worker_init_fn=seed_worker
    )
    images = instances = 0
    start = time.perf_counter()
    for _ in range(passes):
        for batch_images, targets in loader:
            images += len(batch_images)
            instances += sum(len(target["labels"]) for target in targets)
    seconds = time.perf_counter() - start
    return {
        "preset": preset,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "instances_per_s": round(instances / seconds, 1),
        "num_workers": num_workers,
    }


def measure_slices_per_s(
    records: list[VolumeRecord],
    *,
    axes: tuple[int, ...] = (0, 1, 2),
    size: int = 224,
    max_volumes: int = 20,
    workdir: str | Path | None = None,
) -> float:
    """Slices examined per second by `extract_slices` (reading, thresholding, cropping, resizing,
    writing PNGs) on the first `max_volumes` volumes, in a throw-away folder."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        summary = extract_slices(records[:max_volumes], Path(tmp) / "slices", axes=axes, size=size)
    return summary.slices_per_s


def volume_loading(shape: tuple[int, int, int], dtype: str, workdir: str | Path | None = None) -> dict:
    """`load_volume` on a random .nii.gz of this shape and voxel type (CT-like: gamma-distributed, a
    16-bit range): its peak of Python-allocated memory (tracemalloc, numpy's arrays included) over the
    voxels' stored size, and its seconds."""
    voxels = np.random.default_rng(0).gamma(2.0, 3000.0, size=shape).clip(0, 65535).astype(dtype)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "volume.nii.gz"
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), path)
        tracemalloc.start()
        try:
            started = time.perf_counter()
            load_volume(path)
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return {"stored_mib": voxels.nbytes / 2**20, "peak_ratio": peak / voxels.nbytes, "seconds": seconds}


def sample_mosaic_dataset(folder: Path, size: int, cell: int = 256) -> ImageRecord:
    """A size x size label-images dataset in `folder` made of the bundled sample's images and nuclei (each
    image cut to cell x cell, repeated row by row): a mosaic as dense in objects as the sample."""
    records = read_records(SAMPLE_DATA)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.int32)
    corners = [(y, x) for y in range(0, size, cell) for x in range(0, size, cell)]
    count = 0  # nuclei so far: the next one's label is count + 1
    for k, (y, x) in enumerate(corners):
        record = records[k % len(records)]
        pixels = load_image(record.image_path)[: min(cell, size - y), : min(cell, size - x)]
        height, width = pixels.shape[:2]
        image[y : y + height, x : x + width] = pixels
        masks = instance_masks(record, image_size(record.image_path))[0][:, :height, :width]
        masks = masks[masks.any(axis=(1, 2))]  # nuclei the cut left out are gone
        numbers = np.arange(count + 1, count + len(masks) + 1, dtype=np.int32)
        labels[y : y + height, x : x + width] = np.max(masks * numbers[:, None, None], axis=0, initial=0)
        count += len(masks)
    Image.fromarray(image).save(folder / "mosaic.png")
    tifffile.imwrite(folder / "mosaic_masks.tif", labels)
    return read_records(folder, "label-images")[0]


def tile_targets(record: ImageRecord, tile_size: int, tiles: int, whole_image_masks: bool) -> dict:
    """Tiles/s and the peak of Python-allocated memory (tracemalloc) of cutting `tiles` tiles of the
    record's grid (tile_size, overlap 64; spread over it) into training targets: tile_instance_masks, or
    with `whole_image_masks` every instance's whole-image mask decoded, then clipped (the path before)."""
    shape = image_size(record.image_path)
    grid = tile_grid(*shape, tile_size, 64)
    chosen = [grid[i] for i in np.linspace(0, len(grid) - 1, tiles).round().astype(int)]
    tracemalloc.start()
    try:
        started = time.perf_counter()
        for tile in chosen:
            if whole_image_masks:
                clip_instances(instance_masks(record, shape)[0], tile, min_visible=0.1)
            else:
                tile_instance_masks(record, shape, tile, min_visible=0.1)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"tiles_per_s": tiles / seconds, "peak_mib": peak / 2**20}


def tiled_training_data() -> None:
    """Prints tile_targets on sample mosaics: beside the whole-image path on a 1024 px one (its memory
    grows with objects x image size), and alone on an 8192 px one, where that path would need ~2 TiB
    (31,420 masks of 64 MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        for size, paths in ((1024, (True, False)), (8192, (False,))):
            (Path(tmp) / str(size)).mkdir()
            record = sample_mosaic_dataset(Path(tmp) / str(size), size)
            nuclei = len(record.instances)
            print(f"tiled training targets, {size} px sample mosaic ({nuclei} nuclei), 256 px tiles:")
            for whole in paths:
                got = tile_targets(record, 256, 3 if whole else 20, whole)
                name = "whole-image masks, clipped (before)" if whole else "tile_instance_masks"
                print(f"  {name:40s} {got['tiles_per_s']:8.2f} tiles/s, peak {got['peak_mib']:7.0f} MiB")


def model_images_per_s(recipe: str, steps: int) -> tuple[float, int]:
    """(images/s, images) of Mask R-CNN training steps on CPU over the first `steps` batches of the
    bundled sample, after one untimed step (allocations)."""
    cfg = get_recipe(recipe)
    records = read_records(SAMPLE_DATA)[: steps * cfg.batch_size]
    batches = DataLoader(InstanceDataset(records), batch_size=cfg.batch_size, collate_fn=collate)
    return train_rate(cfg, [next(iter(batches))], batches)["images_per_s"], len(records)


def benchmark_data(recipe: str, preset: str, loader_workers: int, steps: int, volumes: Path) -> None:
    """Prints the loader's images/s against the model's (goal: >= 3x), when `volumes` exists the slices/s
    of slicing its first 50 volumes along all axes at 224 px, and load_volume's peak memory."""
    loader = loader_benchmark(preset=preset, passes=2, num_workers=loader_workers)
    model_rate, images = model_images_per_s(recipe, steps)
    ratio = loader["images_per_s"] / model_rate
    print(f"\n{torch.get_num_threads()} CPU threads; bundled sample ({images} images for the model)")
    data_side = f"data loader ({preset} preset, {loader_workers} workers)"
    print(f"{data_side:45s} {loader['images_per_s']:8.2f} images/s")
    print(f"{f'Mask R-CNN training ({recipe})':45s} {model_rate:8.2f} images/s")
    print(f"loader / model: {ratio:.1f}x  (goal >= 3x)")
    if volumes.exists():
        rate = measure_slices_per_s(read_volumes(volumes), axes=(0, 1, 2), size=224, max_volumes=50)
        print(f"volume slicing ({volumes.name}, 50 volumes, all axes, 224 px): {rate:8.0f} slices/s examined")
    else:
        print(f"volume slicing: skipped ({volumes} not found; pass --volumes)")
    # the usual micro-CT voxel types; before the scaling went by chunks: 8.0x for uint16, 4.0x for float32
    for dtype in ("uint16", "float32"):
        got = volume_loading((256, 256, 512), dtype)
        print(
            f"load_volume, {got['stored_mib']:.0f} MiB of {dtype} (.nii.gz): peak {got['peak_ratio']:.1f}x "
            f"its size, {got['seconds']:.2f} s"
        )
    tiled_training_data()
