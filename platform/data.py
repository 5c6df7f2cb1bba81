"""Dataset tools: convert between annotation formats, inspect a dataset, split it, slice volumes.

    python -m platform.data inspect datasets/sample/dsb2018
    python -m platform.data split datasets/sample/dsb2018 --ratio 74:30 --out /tmp/split.json
    python -m platform.data slices ../shared/data/adrenal3d /tmp/slices --axis all \\
        --split train=0.7,val=0.15,test=0.15
    python -m platform.data convert datasets/sample/dsb2018 /tmp/dsb_coco --from mask-folders --to coco
    python -m platform.data convert /tmp/dsb_coco /tmp/dsb_csv --from coco --to rle-csv --to-layout sartorius
    python -m platform.data inspect /tmp/dsb_csv --format rle-csv --plot /tmp/dsb_csv.png

Formats: coco (COCO instances JSON), via (VGG Image Annotator JSON), mask-folders (DSB2018 layout),
rle-csv (Kaggle run-length CSV, DSB2018 or Sartorius layout), label-images (Cellpose/StarDist
<name>_masks.tif label images, or images/ + labels/ folders). A conversion writes to a temporary folder
beside DST and renames it at the end: a failed run leaves nothing behind.
"""

import argparse
import time
from pathlib import Path

from datasets.errors import UserError
from platform import _cli

DESCRIPTION = __doc__.split("\n\n")[0]


def build_parser() -> argparse.ArgumentParser:
    from datasets.instances import FORMATS
    from datasets.rle_csv import LAYOUTS, PIXEL_ORDERS

    formats = sorted(FORMATS)
    p = argparse.ArgumentParser(
        prog="python -m platform.data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="formats:\n" + "\n".join(f"  {n:14s}{f.description}" for n, f in sorted(FORMATS.items())),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def read_options(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--classes",
            help="class names, comma-separated: fixes their order (ids 1..K); "
            "an instance of another class is an error (coco, via, rle-csv)",
        )
        q.add_argument(
            "--pixel-order",
            choices=PIXEL_ORDERS,
            help="rle-csv input: how pixels are numbered (default: the layout's own)",
        )

    q = sub.add_parser("convert", help="convert SRC in one format to the new folder DST in another")
    q.add_argument("src", metavar="SRC")
    q.add_argument("dst", metavar="DST", help="output folder; must not exist yet")
    q.add_argument("--from", dest="src_format", required=True, choices=formats, metavar="FMT")
    q.add_argument("--to", dest="dst_format", required=True, choices=formats, metavar="FMT")
    read_options(q)
    q.add_argument("--to-layout", choices=list(LAYOUTS), help="rle-csv output layout (default dsb2018)")
    q.add_argument(
        "--to-pixel-order",
        choices=PIXEL_ORDERS,
        help="rle-csv output pixel order (default: the layout's own)",
    )

    q = sub.add_parser("inspect", help="summarise a dataset and write a summary plot")
    q.add_argument("path", metavar="PATH")
    q.add_argument("--format", choices=formats, metavar="FMT", help="default: guessed from PATH")
    read_options(q)
    q.add_argument("--plot", help="summary PNG (default: ./<name>_summary.png)")
    q.add_argument("--json", help="also write the summary numbers to this JSON file")

    q = sub.add_parser("split", help="class-stratified image-level split (or k folds) written as JSON")
    q.add_argument("path", metavar="PATH")
    q.add_argument("--format", choices=formats, metavar="FMT", help="default: guessed from PATH")
    read_options(q)
    q.add_argument("--out", required=True, help="split JSON; with --kfold K, OUT-fold<i>.json per fold")
    q.add_argument("--ratio", default="74:30", help="train:val weights, or one number r for r:1 (74:30)")
    q.add_argument("--kfold", type=int, help="write K folds instead of one split")
    q.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("slices", help="micro-CT volumes to 2D slice PNGs + index CSV, specimen-level split")
    q.add_argument(
        "src", metavar="SRC", help="labels CSV, folder with labels.csv, folder per class, or NIfTI"
    )
    q.add_argument("out", metavar="OUT", help="output folder; must not exist yet")
    q.add_argument("--axis", default="0", help="0, 1, 2, a list like 0,2, or all")
    q.add_argument("--size", type=int, default=224, help="slice side in pixels (224 or 384)")
    q.add_argument("--margin", type=float, default=0.1, help="crop margin as a fraction of the object")
    q.add_argument(
        "--crop",
        choices=("object", "none"),
        default="object",
        help="object: square around the object (default); none: the whole slice (keeps object size)",
    )
    q.add_argument(
        "--context", type=int, default=0, help="1: neighbouring slices as RGB channels (2.5D); default 0"
    )
    q.add_argument(
        "--distance-scale",
        type=float,
        default=0.0,
        help="0: raw grey (default); else distance to the background in voxels x this, as grey (thickness)",
    )
    q.add_argument("--min-foreground", type=float, default=0.01, help="drop slices with less object")
    q.add_argument("--split", help="e.g. train=0.7,val=0.15,test=0.15: specimen-level, minimised class CV")
    q.add_argument("--seed", type=int, default=0)
    return p


def _read_options(args) -> dict:
    options = {}
    if args.classes:
        options["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.pixel_order:
        options["pixel_order"] = args.pixel_order
    return options


def convert(args) -> int:
    from datasets.instances import convert as convert_dataset

    write_options = {}
    if args.to_layout:
        write_options["layout"] = args.to_layout
    if args.to_pixel_order:
        write_options["pixel_order"] = args.to_pixel_order
    started = time.time()
    records = convert_dataset(
        args.src, args.dst, args.src_format, args.dst_format, _read_options(args), write_options
    )
    print(
        f"wrote {len(records)} images ({len(records[0].categories)} classes) from {args.src} "
        f"({args.src_format}) to {args.dst} ({args.dst_format}) in {time.time() - started:.1f} s"
    )
    return 0


def inspect(args) -> int:
    from datasets.instances import guess_format, read_records
    from datasets.records import write_json_atomic
    from datasets.summary import format_summary, plot_summary, summarize

    fmt = args.format or guess_format(args.path)
    records = read_records(args.path, fmt, **_read_options(args))
    summary = summarize(records)
    print(f"{args.path} ({fmt})")
    print(format_summary(summary))
    name = Path(args.path).resolve().name
    plot = plot_summary(summary, Path(args.plot or f"{name}_summary.png"), f"{name} ({fmt})")
    print(f"plot: {plot}")
    if args.json:
        write_json_atomic(args.json, summary)
        print(f"numbers: {args.json}")
    return 0


def split(args) -> int:
    from datasets.instances import guess_format, read_records
    from datasets.records import instance_labels
    from datasets.splits import stratified_kfold, stratified_split, write_split

    fmt = args.format or guess_format(args.path)
    records = read_records(args.path, fmt, **_read_options(args))
    items = [(r.image_id, instance_labels(r)) for r in records]
    out = Path(args.out)
    if args.kfold:
        for i, fold in enumerate(stratified_kfold(items, args.kfold, args.seed)):
            path = write_split(out.with_name(f"{out.stem}-fold{i}{out.suffix or '.json'}"), fold)
            print(f"{path}: train {len(fold['train'])}, val {len(fold['val'])} images")
        return 0
    try:
        ratio = [float(x) for x in args.ratio.split(":")]
    except ValueError:
        raise UserError(f"--ratio: expected weights like 74:30 or one number, got {args.ratio!r}") from None
    result = stratified_split(items, ratio[0] if len(ratio) == 1 else ratio, args.seed)
    write_split(out, result)
    print(f"{out}: " + ", ".join(f"{name} {len(ids)}" for name, ids in result.items()) + " images")
    return 0


def slices(args) -> int:
    import logging

    from datasets.slice_index import extract_slices, set_index_splits, slices_per_specimen
    from datasets.specimen_split import format_split_report, parse_fractions, search_split
    from datasets.volumes import read_volumes, specimen_labels

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the extractor's progress lines
    fractions = parse_fractions(args.split) if args.split else None  # bad fractions fail before the work
    records = read_volumes(args.src)
    summary = extract_slices(
        records,
        args.out,
        axes=args.axis,
        size=args.size,
        margin=args.margin,
        min_foreground=args.min_foreground,
        crop=args.crop,
        context=args.context,
        distance_scale=args.distance_scale,
    )
    print(
        f"{summary.volumes} volumes -> {summary.slices_written} slices written, {summary.slices_dropped} "
        f"dropped (low content) in {summary.seconds:.1f} s ({summary.slices_per_s:.0f} slices/s); "
        f"index: {summary.index_csv}"
    )
    if fractions:
        # Split by specimen, balancing the class counts of the slices actually written.
        result = search_split(
            specimen_labels(records),
            fractions,
            weights=slices_per_specimen(summary.index_csv),
            seed=args.seed,
        )
        set_index_splits(summary.index_csv, result.split_of)
        print(format_split_report(result))
    return 0


COMMANDS = {"convert": convert, "inspect": inspect, "split": split, "slices": slices}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    _cli.run(main)
