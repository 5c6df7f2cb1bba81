"""Tiny labelled volume sets for classifier tests: two classes that a small CNN tells apart in a few steps."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np


def ball_or_box(kind: str, size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A 0/255 uint8 volume holding a filled ball or a hollow box (2-voxel walls) around a jittered centre:
    most slices are a disc or a ring, which a small CNN tells apart within a few epochs."""
    centre = size / 2 + rng.uniform(-1.5, 1.5, 3)
    grid = np.indices((size, size, size)).astype(np.float32) + 0.5
    offset = [grid[i] - centre[i] for i in range(3)]
    if kind == "ball":
        inside = sum(o**2 for o in offset) <= radius**2
    else:
        outer = np.all([np.abs(o) <= radius for o in offset], axis=0)
        inside = outer & ~np.all([np.abs(o) <= radius - 2 for o in offset], axis=0)
    return (inside * 255).astype(np.uint8)


def write_volumes(root: Path, per_class: int = 8, size: int = 16, seed: int = 0) -> Path:
    """root/volumes/*.nii.gz + root/labels.csv (file,label) with `per_class` balls and boxes; returns the
    labels CSV."""
    rng = np.random.default_rng(seed)
    (root / "volumes").mkdir(parents=True)
    rows = []
    for kind in ("ball", "box"):
        for i in range(per_class):
            volume = ball_or_box(kind, size, rng.uniform(size * 0.2, size * 0.35), rng)
            name = f"{kind}_{i:02d}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "volumes" / name)
            rows.append((name, kind))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    return labels


# A small, quick configuration of the CPU recipe for these volumes (overrides, as a user would type them).
TINY = dict(
    slice_size=16,
    input_size=32,
    model_name="resnet18",
    val_fraction=0.25,
    epochs=3,
    head_epochs=0,
    lr=2e-3,
    batch_size=8,
    slices_per_specimen=4,
    val_slices_per_specimen=6,
)
