"""A sliced dataset on disk: the PNG of every kept slice and the index CSV that lists them.

`extract_slices` writes each kept slice (datasets/slicing.py) as an 8-bit PNG (grey, or RGB with
context=1; classifier loaders convert to RGB) and one index row per PNG:

    path,specimen,label,split,axis,slice_index,foreground,crop_row0,crop_col0,crop_row1,crop_col1,source

`path` is relative to the output folder (<label>/<specimen>_axis<a>_<index>.png); the split lives only
in the CSV, so a split can be (re)assigned after extraction with `set_index_splits`, for example once the
slice counts per specimen are known (see datasets/specimen_split.py).

The CLI (platform/data.py):

    python -m platform.data slices ../shared/data/adrenal3d out/adrenal_slices --axis all --size 224 \\
        --split train=0.7,val=0.15,test=0.15 --seed 0

and from Python:

    records = read_volumes("../shared/data/adrenal3d")
    summary = extract_slices(records, "out/adrenal_slices", axes=parse_axes("all"))
    print(summary.slices_per_s)
"""

import csv
import io
import itertools
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datasets.errors import UserError
from datasets.progress import Progress
from datasets.records import folder_written_atomically, write_text_atomic
from datasets.slicing import SliceResult, check_slicing, iter_slices, parse_axes
from datasets.volumes import VolumeRecord

log = logging.getLogger(__name__)

INDEX_COLUMNS = (
    "path",
    "specimen",
    "label",
    "split",
    "axis",
    "slice_index",
    "foreground",
    "crop_row0",
    "crop_col0",
    "crop_row1",
    "crop_col1",
    "source",
)
UNLABELLED = "unlabelled"  # folder name for slices of volumes without a label
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ExtractSummary:
    out_dir: Path
    index_csv: Path
    volumes: int
    slices_written: int
    slices_dropped: int
    seconds: float
    slices_per_s: float  # slices examined (written + dropped) per second, the pipeline's throughput
    written_per_s: float  # PNGs written per second


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "_"


def _check_split_of(specimens: Iterable[str], split_of: Mapping[str, str], where: str = "") -> None:
    missing = sorted(set(specimens) - set(split_of))
    if missing:
        raise UserError(f"{where}split assignment has no split for specimen(s) {', '.join(missing[:5])}")


def extract_slices(
    records: Sequence[VolumeRecord],
    out_dir: str | Path,
    *,
    axes: Sequence[int] | str = (0,),
    size: int = 224,
    margin: float = 0.1,
    min_foreground: float = 0.01,
    crop: str = "object",
    context: int = 0,
    distance_scale: float = 0.0,
    split_of: Mapping[str, str] | None = None,
    overwrite: bool = False,
    log_every_s: float = 10.0,
) -> ExtractSummary:
    """Writes `out_dir/<label>/<specimen>_axis<a>_<index>.png` and `out_dir/index.csv`.

    Everything goes to a temporary folder next to `out_dir` that is renamed at the end, so a failure
    leaves no partial output. `split_of` (specimen -> split name) fills the CSV's split column; without
    it the column is empty. Reports progress (volumes, ETA, slices/s) every `log_every_s` seconds.
    """
    out_dir = Path(out_dir).resolve()
    settings = dict(
        axes=parse_axes(axes if isinstance(axes, str | int) else list(axes)),
        size=size,
        margin=margin,
        min_foreground=min_foreground,
        crop=crop,
        context=context,
        distance_scale=distance_scale,
    )
    check_slicing(size, margin, min_foreground, crop, context, distance_scale)
    if not records:
        raise UserError("no volumes to slice (empty dataset)")
    if split_of is not None:
        _check_split_of((r.specimen for r in records), split_of)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists (choose a new output folder or overwrite it)")
    start = time.perf_counter()
    with folder_written_atomically(out_dir) as work:
        work.mkdir()
        written, dropped = _write_slices(records, settings, work, split_of, log_every_s)
    seconds = time.perf_counter() - start
    rate = (written + dropped) / seconds if seconds > 0 else 0.0
    log.info(
        "slices: %d volumes, %d written, %d dropped in %.1f s (%.0f slices/s) -> %s",
        len(records),
        written,
        dropped,
        seconds,
        rate,
        out_dir,
    )
    return ExtractSummary(
        out_dir, out_dir / "index.csv", len(records), written, dropped, seconds, rate, written / seconds
    )


def _write_slices(
    records: Sequence[VolumeRecord],
    settings: dict,
    folder: Path,
    split_of: Mapping[str, str] | None,
    log_every_s: float,
) -> tuple[int, int]:
    """Every kept slice's PNG under `folder` and its row in `folder/index.csv`; (written, dropped)."""
    written = dropped = 0
    taken: set[str] = set()
    # final=False: extract_slices logs the totals itself once the folder is in place
    progress = Progress(len(records), "slices", "volumes", log.info, every_s=log_every_s, final=False)
    with open(folder / "index.csv", "w", newline="") as f, progress:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        for _, volume in itertools.groupby(iter_slices(records, **settings), key=lambda s: s.record):
            for s in volume:
                if not s.kept:
                    dropped += 1
                    continue
                split = split_of[s.record.specimen] if split_of is not None else ""
                writer.writerow(_save_slice(s, folder, taken, split))
                written += 1
            rate = (written + dropped) / max(time.perf_counter() - progress.started, 1e-9)
            progress.update(1, f"{written} written, {dropped} dropped, {rate:.0f} slices/s")
    return written, dropped


def _save_slice(s: SliceResult, folder: Path, taken: set[str], split: str) -> list:
    """Writes one kept slice's PNG under `folder` (its relative path joins `taken`); its index row."""
    rel = f"{_safe(s.record.label or UNLABELLED)}/{_safe(s.record.specimen)}_axis{s.axis}_{s.index:04d}.png"
    if rel in taken:
        raise UserError(
            f"{s.record.where}: specimen {s.record.specimen!r} gives slice file {rel} twice "
            "(two volumes of one specimen, or specimen names equal after removing symbols)"
        )
    taken.add(rel)
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    # compress_level 1: PNGs of slices are small anyway and level 6 halves the throughput
    Image.fromarray(s.image).save(folder / rel, compress_level=1)
    row = [rel, s.record.specimen, s.record.label, split, s.axis, s.index, f"{s.foreground:.5f}", *s.crop]
    return [*row, str(s.record.path)]


def read_index(index_csv: str | Path) -> list[dict[str, str]]:
    index_csv = Path(index_csv)
    with open(index_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{index_csv}: not a slice index (missing columns {', '.join(missing)})")
        return list(reader)


def slices_per_specimen(index_csv: str | Path) -> dict[str, int]:
    """Written slices per specimen: the weights for a split balanced in slices rather than specimens."""
    counts: dict[str, int] = {}
    for row in read_index(index_csv):
        counts[row["specimen"]] = counts.get(row["specimen"], 0) + 1
    return counts


def set_index_splits(index_csv: str | Path, split_of: Mapping[str, str]) -> None:
    """Rewrites the split column of an index CSV in place (atomically: temp file then rename)."""
    index_csv = Path(index_csv)
    rows = read_index(index_csv)
    _check_split_of((r["specimen"] for r in rows), split_of, where=f"{index_csv}: ")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INDEX_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "split": split_of[row["specimen"]]})
    write_text_atomic(index_csv, text.getvalue())
