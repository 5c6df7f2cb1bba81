"""The served slice library (a folder of NIfTI volumes) for "find this slice in 3D": finding its volumes,
and drawing a matched slice and where it lies in its volume, as PNG for the page."""

import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from datasets.errors import UserError

VOLUME_SUFFIXES = (".nii", ".nii.gz")
POSITION_COLOUR = (255, 64, 64)


def library_paths(folder: str) -> list[Path]:
    """The NIfTI volumes directly in `folder`, sorted by name; UserError if there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"library: {folder} is not a folder (expected a folder of .nii/.nii.gz volumes)")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(VOLUME_SUFFIXES))
    if not paths:
        raise UserError(f"library: {folder} has no .nii or .nii.gz volumes")
    return paths


def volume_shape(path: Path) -> list[int]:
    """The volume's shape from its header (the data is not read)."""
    try:
        return [int(n) for n in nib.load(path).shape[:3]]
    except Exception as e:  # nibabel raises many types for a bad file; all mean "not a volume"
        raise UserError(f"{path}: not a readable NIfTI volume ({str(e).splitlines()[0]})") from None


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def slice_image(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice `index` across `axis` of a uint8 volume, as the matcher saw it (datasets.matching)."""
    if not 0 <= axis <= 2:
        raise UserError(f"axis: expected 0, 1 or 2, got {axis}")
    if not 0 <= index < volume.shape[axis]:
        raise UserError(f"index: expected 0 to {volume.shape[axis] - 1} along axis {axis}, got {index}")
    return np.ascontiguousarray(np.moveaxis(volume, axis, 0)[index])


def position_image(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Where slice `index` across `axis` lies: the maximum-intensity projection of the volume along the
    next axis, with the slice's plane drawn as a line (RGB)."""
    slice_image(volume, axis, index)  # validates axis and index
    across = (axis + 1) % 3
    projection = volume.max(axis=across)  # the remaining two axes, in their original order
    rgb = np.repeat(projection[..., None], 3, axis=2)
    # `axis` is the projection's rows when it comes before the other remaining axis
    if axis < 3 - axis - across:
        rgb[index] = POSITION_COLOUR
    else:
        rgb[:, index] = POSITION_COLOUR
    return rgb
