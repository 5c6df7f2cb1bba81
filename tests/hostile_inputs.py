"""Hostile dataset files of issue #21, each built in a fresh folder: the regression tests
(tests/test_hostile_inputs.py) read them, and `python -m tests.hostile_inputs` measures each one's peak
memory and outcome in a subprocess under a memory cap (the before/after table of the issue).

    python -m tests.hostile_inputs            # every case, 4 GiB cap
"""

import gzip
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = (8, 6)  # width, height of the small images the cases annotate


def tiny_image(folder: Path, name: str = "a.png", size: tuple[int, int] = IMAGE_SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 80, 120)).save(folder / name)
    return folder / name


def coco_file(folder: Path, segmentation, image: dict | None = None, annotation: dict | None = None) -> Path:
    """A one-image, one-annotation COCO file beside an 8x6 a.png; `image`/`annotation` override fields."""
    tiny_image(folder)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6, **(image or {})}],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "segmentation": segmentation, **(annotation or {})}
        ],
        "categories": [{"id": 1, "name": "cell"}],
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps(data))  # json writes NaN and Infinity as the bare words JSON readers take
    return path


def via_file(folder: Path, regions, size: tuple[int, int] = IMAGE_SIZE, **top) -> Path:
    """A one-image VIA export beside a.png of `size`; `top` adds top-level keys (a VIA project)."""
    tiny_image(folder, size=size)
    entry = {"filename": "a.png", "size": 1, "regions": regions, "file_attributes": {}}
    data = {"_via_img_metadata": {"a.png1": entry}, **top} if top else {"a.png1": entry}
    path = folder / "via_region_data.json"
    path.write_text(json.dumps(data))
    return path


def polygon_region(xs, ys, category="1") -> dict:
    return {
        "shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
        "region_attributes": {"category": category},
    }


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height zero pixels, written row by row: a few kB on disk for hundreds
    of megapixels decoded (PIL's decompression-bomb limit is 89 MP)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def nifti_with_dim(path: Path, axis: int, value: int) -> Path:
    """A 4x4x4 uint8 NIfTI-1 file whose header's dim[axis] is set to `value` (e.g. negative)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), path.with_suffix(".tmp.nii"))
    data = bytearray(path.with_suffix(".tmp.nii").read_bytes())
    path.with_suffix(".tmp.nii").unlink()
    dims = list(struct.unpack("<8h", data[40:56]))
    dims[axis] = value
    data[40:56] = struct.pack("<8h", *dims)
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


def zigzag(vertices: int, width: int, height: int) -> list[float]:
    """A polygon inside the image whose edges cross it from side to side: a long outline from few points."""
    xs = np.where(np.arange(vertices) % 2, width, 0)
    ys = np.linspace(0, height, vertices)
    return np.stack([xs, ys], axis=1).ravel().tolist()


# ------------------------------------------------------------------------------------------ the cases
# Each builds its files in `folder` and returns (path, format): a dataset format, or "volume" (a NIfTI
# file for load_volume) or "mask-folders" with a bad mask.
def _long_outline(folder):
    path = coco_file(folder, [zigzag(20_000, 2000, 2000)], image={"width": 2000, "height": 2000})
    tiny_image(folder, "a.png", (2000, 2000))  # replaces coco_file's 8x6 image
    return path


def _outside_file(folder, absolute: bool):
    outside = tiny_image(folder.parent, "x.png")  # ../x.png from the dataset folder
    return coco_file(
        folder, [[1, 1, 4, 1, 4, 4]], image={"file_name": str(outside) if absolute else "../x.png"}
    )


def _mask_bomb(folder):
    tiny_image(folder / "a" / "images", "a.png")
    (folder / "a" / "masks").mkdir()
    png_bomb(folder / "a" / "masks" / "0.png", 20_000, 20_000)
    return folder


def _rgb24(folder):
    import nibabel as nib

    voxels = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), folder / "rgb.nii")
    return folder / "rgb.nii"


def _negative_dim(folder):
    folder.mkdir(parents=True, exist_ok=True)
    return nifti_with_dim(folder / "negative.nii", 2, -32768)


NAN = float("nan")
SQUARE = [1, 1, 4, 1, 4, 4, 1, 4]
# name -> (builder(folder) -> path, format, a regex the one-line error matches after the fix)
CASES = {
    "coco-nan-polygon": (
        lambda f: coco_file(f, [[1, 1, NAN, 1, 4, 4]]),
        "coco",
        r"annotation 5, polygon 0: .*finite",
    ),
    "coco-inf-polygon": (
        lambda f: coco_file(f, [[1, 1, float("inf"), 1, 4, 4]]),
        "coco",
        r"annotation 5, polygon 0: .*finite",
    ),
    "coco-string-coordinate": (
        lambda f: coco_file(f, [["1", 1, 4, 1, 4, 4]]),
        "coco",
        r"polygon 0: .*number",
    ),
    "coco-long-outline": (_long_outline, "coco", r"polygon 0: .*outline"),
    "coco-too-many-points": (lambda f: coco_file(f, [[1.0] * 200_002]), "coco", r"polygon 0: .*points"),
    "coco-short-rle": (
        lambda f: coco_file(f, {"size": [6, 8], "counts": "02"}),
        "coco",
        r"annotation 5: RLE counts cover 2 pixels .* has 48",
    ),
    "coco-rle-float-counts": (
        lambda f: coco_file(f, {"size": [6, 8], "counts": [24.0, 24.0]}),
        "coco",
        r"annotation 5: .*integer",
    ),
    "coco-rle-non-ascii": (
        lambda f: coco_file(f, {"size": [6, 8], "counts": "0é2"}),
        "coco",
        r"annotation 5: .*counts",
    ),
    "coco-rle-size-not-a-list": (
        lambda f: coco_file(f, {"size": 48, "counts": [48]}),
        "coco",
        r"annotation 5: .*size",
    ),
    "coco-rle-size-one-number": (
        lambda f: coco_file(f, {"size": [48], "counts": [48]}),
        "coco",
        r"annotation 5: .*size",
    ),
    "coco-iscrowd-string": (
        lambda f: coco_file(f, [SQUARE], annotation={"iscrowd": "yes"}),
        "coco",
        r"annotation 5: .*iscrowd",
    ),
    "coco-iscrowd-list": (
        lambda f: coco_file(f, [SQUARE], annotation={"iscrowd": [1]}),
        "coco",
        r"annotation 5: .*iscrowd",
    ),
    "coco-height-bool": (
        lambda f: coco_file(f, [SQUARE], image={"height": True}),
        "coco",
        r"images\[0\]: .*height",
    ),
    "coco-file-name-parent": (lambda f: _outside_file(f, absolute=False), "coco", r"image 1 .*inside"),
    "coco-file-name-absolute": (lambda f: _outside_file(f, absolute=True), "coco", r"image 1 .*inside"),
    "via-nan-polygon": (
        lambda f: via_file(f, [polygon_region([1, NAN, 4], [1, 1, 4])]),
        "via",
        r"region 0: .*finite",
    ),
    "via-rect-strings": (
        lambda f: via_file(
            f,
            [
                {
                    "shape_attributes": {"name": "rect", "x": "1", "y": 1, "width": "2", "height": 2},
                    "region_attributes": {"category": "1"},
                }
            ],
            size=(20, 20),
        ),
        "via",
        r"region 0, shape_attributes: field 'x' must be int or float, got str",
    ),
    "via-region-attributes-list": (
        lambda f: via_file(f, [{**polygon_region([1, 4, 4], [1, 1, 4]), "region_attributes": ["1"]}]),
        "via",
        r"region 0: .*region_attributes",
    ),
    "via-project-attributes-list": (
        lambda f: via_file(f, [polygon_region([1, 4, 4], [1, 1, 4])], _via_attributes=["category"]),
        "via",
        r"_via_attributes",
    ),
    "via-options-list": (
        lambda f: via_file(
            f,
            [polygon_region([1, 4, 4], [1, 1, 4])],
            _via_attributes={"region": {"category": {"options": ["a", "b"]}}},
        ),
        "via",
        r"options",
    ),
    "via-regions-mixed-keys": (
        lambda f: via_file(
            f, {"0": polygon_region([1, 4, 4], [1, 1, 4]), "x": polygon_region([1, 4, 4], [1, 1, 4])}
        ),
        "via",
        None,  # a valid dataset: keys sorted numbers first
    ),
    "mask-folders-png-bomb": (_mask_bomb, "mask-folders", r"0.png: .*too large"),
    "nifti-negative-dim": (_negative_dim, "volume", r"negative.nii: .*dimension"),
    "nifti-rgb24": (_rgb24, "volume", r"rgb.nii: .*type"),
}


def load_case(path: str | Path, fmt: str, rasterise: bool) -> int:
    """Read a case as the platform does; with `rasterise`, every instance too, as a conversion does.
    Returns the number of mask (or non-zero voxel) pixels."""
    if fmt == "volume":
        from datasets.volumes import load_volume

        return int(np.count_nonzero(load_volume(path)))
    from pycocotools import mask as mask_utils

    from datasets.coco import read_coco
    from datasets.mask_folders import read_mask_folders
    from datasets.records import image_size, record_rles
    from datasets.via import read_via

    # the readers themselves, not datasets.instances: its torch import would hide their memory use
    reader = {"coco": read_coco, "via": read_via, "mask-folders": read_mask_folders}[fmt]
    pixels = 0
    for record in reader(path):
        if rasterise:
            for rle, _ in record_rles(record, *image_size(record.image_path)):
                pixels += int(mask_utils.area(rle))
    return pixels


def limit_memory(cap_bytes: int) -> None:
    """Cap this process's address space: an allocation past it fails (MemoryError, or a C library's
    NULL) instead of taking the machine down."""
    resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def measure(name: str, cap_gib: float = 4.0) -> tuple[str, float]:
    """(outcome, peak RSS in MiB) of reading and rasterising case `name` in a subprocess under a cap."""
    with tempfile.TemporaryDirectory() as tmp:
        build, fmt, _ = CASES[name]
        path = build(Path(tmp) / "data")
        code = (
            f"from tests.hostile_inputs import limit_memory, load_case; "
            f"limit_memory({int(cap_gib * 2**30)}); print(load_case({str(path)!r}, {fmt!r}, True))"
        )
        with open(Path(tmp) / "out.txt", "w+") as out:
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS, in KiB on Linux
            out.seek(0)
            lines = out.read().strip().splitlines() or ["(no output)"]
    code = os.waitstatus_to_exitcode(status)
    outcome = f"exit 0, {lines[-1]} mask pixels" if code == 0 else f"exit {code}: {lines[-1][:150]}"
    return outcome, usage.ru_maxrss / 1024


if __name__ == "__main__":
    for case in sys.argv[1:] or CASES:
        outcome, peak_mib = measure(case)
        print(f"{case:24s} peak {peak_mib:8.0f} MiB  {outcome}")
