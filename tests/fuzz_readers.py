"""Property-based fuzzing (Hypothesis) of every dataset reader and decoder: for any generated input (a
near-valid document with hostile values, a damaged file, random bytes) the reader returns a valid result
or raises the project's one-line error (UserError, or BadImage for the prediction reader), never another
exception, a hang or a crash. Valid results are used as the platform uses them (masks rasterised, images
normalised), and a decoded RLE must equal the runs it was checked against.

Run in a subprocess under an address-space cap (tests/test_fuzz_readers.py), so that a blow-up is a
failed test, not a lost machine:

    python -m tests.fuzz_readers coco --examples 200 --cap-gib 3
"""

import argparse
import copy
import io
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from datasets.errors import UserError
from datasets.microscopy import BadImage, read_image
from datasets.normalize import NORMALIZATIONS, normalize
from datasets.records import image_size, load_image, record_rles, rle_counts
from tests.hostile_inputs import limit_memory, tiny_image

HEIGHT, WIDTH = 6, 8  # the images the generated annotations refer to (tiny_image)


def hostile():
    """A JSON value of any type, with the numbers that break naive checks: NaN, inf, negative, huge."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.lists(st.integers(-3, 60), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


def maybe(valid):
    """Mostly `valid` (a document with one bad field among many valid ones is the likely mistake), one
    time in eight a hostile value instead."""
    return st.integers(0, 7).flatmap(
        lambda k: hostile() if k == 3 else valid
    )  # 0 and 7: Hypothesis' favourites


COORD = st.one_of(st.integers(-2, 10), st.floats(-2, 10), hostile())
# NaN on its own branch: it compares false, so it is the value that slips through naive range checks
SPECIAL = st.one_of(
    st.just(float("nan")),
    st.sampled_from([float("inf"), -float("inf"), 1e308, -5, 1e9, 2**70, "1", True, None]),
)


@st.composite
def polygons(draw, valid: bool = False) -> list:
    """3 to 6 points inside the 8x6 image, unless `valid` often with one value replaced by a special one
    (NaN, ...) or an odd count."""
    xy = st.tuples(st.one_of(st.integers(0, WIDTH), st.floats(-1, WIDTH + 1)), st.integers(0, HEIGHT))
    points = [v for point in draw(st.lists(xy, min_size=3, max_size=6)) for v in point]
    if valid:
        return points
    if draw(st.booleans()):
        points[draw(st.integers(0, len(points) - 1))] = draw(SPECIAL)
    return points if draw(st.integers(0, 7)) else points[:-1]


@st.composite
def compressed_counts(draw, valid: bool = False) -> str:
    """pycocotools' string of a random 6x8 mask, unless `valid` sometimes cut short or with a character
    changed."""
    bits = np.array(draw(st.lists(st.booleans(), min_size=HEIGHT * WIDTH, max_size=HEIGHT * WIDTH)))
    text = mask_utils.encode(np.asfortranarray(bits.reshape(HEIGHT, WIDTH).astype(np.uint8)))["counts"]
    text = text.decode()
    if valid:
        return text
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    if text and draw(st.booleans()):
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.characters(max_codepoint=300)) + text[i + 1 :]
    return text


COUNTS = st.one_of(
    compressed_counts(),
    st.lists(maybe(st.integers(0, 48)), max_size=5),
    st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=115), max_size=10),
    hostile(),
)
SEGMENTATION = st.one_of(
    st.lists(polygons(), min_size=1, max_size=2),
    st.lists(st.lists(COORD, max_size=12), max_size=2),
    st.fixed_dictionaries({"size": maybe(st.just([HEIGHT, WIDTH])), "counts": COUNTS}),
    hostile(),
)
FILE_NAMES = st.sampled_from(["a.png", "images/a.png", "../a.png", "/etc/hostname", "a\0.png", "x" * 300, ""])


def _paths(value, path=()):
    """Every place in a JSON document: each container and each leaf, as a tuple of keys and indices."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


@st.composite
def mutated(draw, valid):
    """A valid document with one place replaced by a hostile value, cut short or removed: every field is
    reached with everything else valid, so a check that lets one bad value through reaches the code behind
    it."""
    doc = copy.deepcopy(draw(valid))  # st.just hands out one shared object: never change it
    # a uniform choice: Hypothesis' own choices favour the first places, and every place must be reached
    path = random.Random(draw(st.integers(0, 2**32))).choice(list(_paths(doc))[1:])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    if isinstance(value, str) and value and draw(st.booleans()):  # a cut string: RLE counts, a file name
        parent[path[-1]] = value[: draw(st.integers(0, len(value) - 1))]
    elif isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(st.one_of(SPECIAL, hostile()))
    return doc


def coco_documents():
    image = st.fixed_dictionaries(
        {
            "id": maybe(st.just(1)),
            "file_name": maybe(st.one_of(st.just("a.png"), FILE_NAMES)),
            "width": maybe(st.just(WIDTH)),
            "height": maybe(st.just(HEIGHT)),
        }
    )
    annotation = st.fixed_dictionaries(
        {"image_id": maybe(st.just(1)), "category_id": maybe(st.just(1)), "segmentation": SEGMENTATION},
        optional={"id": hostile(), "iscrowd": maybe(st.sampled_from([0, 1]))},
    )
    category = st.fixed_dictionaries({"id": maybe(st.just(1)), "name": maybe(st.text(max_size=4))})
    return st.fixed_dictionaries(
        {
            "images": maybe(st.lists(maybe(image), min_size=1, max_size=1)),
            "annotations": maybe(st.lists(maybe(annotation), max_size=3)),
            "categories": maybe(st.lists(maybe(category), min_size=1, max_size=2)),
        }
    )


def via_documents():
    polygon = st.fixed_dictionaries(
        {
            "name": maybe(st.sampled_from(["polygon", "polyline"])),
            "all_points_x": maybe(st.one_of(polygons().map(lambda p: p[0::2]), st.lists(COORD, max_size=6))),
            "all_points_y": maybe(st.one_of(polygons().map(lambda p: p[1::2]), st.lists(COORD, max_size=6))),
        }
    )
    rect = st.fixed_dictionaries(
        {"name": st.just("rect"), **{k: maybe(st.integers(-2, 9)) for k in ("x", "y", "width", "height")}}
    )
    region = st.fixed_dictionaries(
        {
            "shape_attributes": maybe(st.one_of(polygon, rect)),
            "region_attributes": maybe(st.fixed_dictionaries({"category": maybe(st.sampled_from(["1", 2]))})),
        }
    )
    regions = st.one_of(
        st.lists(maybe(region), max_size=3),
        st.dictionaries(st.sampled_from(["0", "1", "10", "x", "²"]), maybe(region), max_size=3),
    )
    entry = st.fixed_dictionaries(
        {"filename": maybe(st.one_of(st.just("a.png"), FILE_NAMES)), "regions": maybe(regions)}
    )
    export = st.one_of(
        st.dictionaries(st.text(max_size=3), maybe(entry), max_size=2), st.lists(entry, max_size=2)
    )
    attributes = maybe(st.fixed_dictionaries({"region": maybe(st.fixed_dictionaries({"category": maybe(
        st.fixed_dictionaries({"options": maybe(st.dictionaries(st.sampled_from(["1", "2"]), hostile()))})
    )}))}))  # fmt: skip
    project = st.fixed_dictionaries({"_via_img_metadata": maybe(export), "_via_attributes": attributes})
    return st.one_of(export, project)


def rle_csv_texts():
    header = st.sampled_from(
        [
            "ImageId,EncodedPixels,Height,Width",
            "ImageId,EncodedPixels",
            "id,annotation,width,height,cell_type",
        ]
    )
    number = st.one_of(
        st.integers(-5, 60).map(str), st.integers(-(2**70), 2**70).map(str), st.text(max_size=4)
    )
    encoding = st.lists(number, max_size=6).map(" ".join)
    row = st.tuples(st.sampled_from(["a", "b", ""]), encoding, number, number, st.text(max_size=3))
    return st.tuples(header, st.lists(row, max_size=3)).map(_csv_text)


def _csv_text(header_rows: tuple[str, list[tuple]]) -> str:
    header, rows = header_rows
    return "\n".join([header, *(",".join(row[: header.count(",") + 1]) for row in rows)])


ARRAYS = st.tuples(
    st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_]),
    st.sampled_from([(HEIGHT, WIDTH), (1, 1), (2, HEIGHT, WIDTH), (HEIGHT, WIDTH, 3), (HEIGHT, WIDTH, 5)]),
    st.sampled_from([0.0, 1.0, -7.0, 300.0, 70000.0, np.nan, np.inf, -np.inf]),
)


def image_bytes(suffix: str):
    """The bytes of an image file: a written array of any type and shape, maybe cut, or random bytes."""

    @st.composite
    def build(draw) -> bytes:
        if draw(st.integers(0, 3)) == 0:
            magic = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*"]))
            return magic + draw(st.binary(max_size=200))
        dtype, shape, special = draw(ARRAYS)
        values = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
        values.flat[draw(st.integers(0, values.size - 1))] = special
        with np.errstate(invalid="ignore", over="ignore"):
            array = values.astype(dtype)
        buffer = io.BytesIO()
        try:
            if suffix == ".png":
                Image.fromarray(array).save(buffer, format="PNG")
            else:
                tifffile.imwrite(buffer, array)
        except (TypeError, ValueError, KeyError, OSError):  # PIL cannot write every type: random bytes
            return draw(st.binary(max_size=100))
        data = buffer.getvalue()
        return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data

    return build()


def use(records) -> None:
    """What the platform does with a dataset: rasterise each instance (checked against its runs when it is
    an RLE) and decode each image."""
    for record in records:
        height, width = image_size(record.image_path)
        for rle, instance in record_rles(record, height, width):
            mask = mask_utils.decode(rle)
            seg = instance.segmentation
            if isinstance(seg, dict) and not instance.row_major:
                counts = rle_counts(seg["counts"], "fuzz")
                runs = np.repeat(np.arange(len(counts)) % 2, counts).reshape((height, width), order="F")
                assert np.array_equal(mask, runs), "pycocotools decoded other pixels than the checked runs"
        load_image(record.image_path)


def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


def valid_coco():
    rle = st.fixed_dictionaries({"size": st.just([HEIGHT, WIDTH]), "counts": compressed_counts(valid=True)})
    annotation = st.fixed_dictionaries(
        {
            "id": st.integers(1, 9),
            "image_id": st.just(1),
            "category_id": st.just(1),
            "segmentation": st.one_of(st.lists(polygons(valid=True), min_size=1, max_size=2), rle),
            "iscrowd": st.sampled_from([0, 1]),
        }
    )
    return st.fixed_dictionaries(
        {
            "images": st.just([{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}]),
            "annotations": st.lists(annotation, min_size=1, max_size=3),
            "categories": st.just([{"id": 1, "name": "cell"}]),
        }
    )


@given(
    st.one_of(mutated(valid_coco()), coco_documents()).map(lambda d: json.dumps(d).encode())
    | st.binary(max_size=200)
)
def fuzz_coco(data: bytes) -> None:
    from datasets.coco import read_coco

    folder = _folder()
    tiny_image(folder)
    (folder / "annotations.json").write_bytes(data)
    _expect_user_error(lambda: use(read_coco(folder)))


def valid_via():
    polygon = polygons(valid=True).map(
        lambda p: {"name": "polygon", "all_points_x": p[0::2], "all_points_y": p[1::2]}
    )
    rect = st.just({"name": "rect", "x": 1, "y": 1, "width": 3, "height": 2})
    region = st.fixed_dictionaries(
        {"shape_attributes": st.one_of(polygon, rect), "region_attributes": st.just({"category": "1"})}
    )
    entry = st.fixed_dictionaries(
        {"filename": st.just("a.png"), "regions": st.lists(region, min_size=1, max_size=3)}
    )
    return st.one_of(
        entry.map(lambda e: {"a.png1": e}),
        entry.map(
            lambda e: {
                "_via_img_metadata": {"a.png1": e},
                "_via_attributes": {"region": {"category": {"options": {"1": "forams"}}}},
            }
        ),
    )


@given(st.one_of(mutated(valid_via()), via_documents()).map(json.dumps))
def fuzz_via(text: str) -> None:
    from datasets.via import read_via

    folder = _folder()
    tiny_image(folder)
    (folder / "via_region_data.json").write_text(text)
    _expect_user_error(lambda: use(read_via(folder)))


@given(st.one_of(rle_csv_texts().map(str.encode), st.binary(max_size=200)))
def fuzz_rle_csv(data: bytes) -> None:
    from datasets.rle_csv import read_rle_csv

    folder = _folder()
    tiny_image(folder / "images")
    (folder / "annotations.csv").write_bytes(data)
    _expect_user_error(lambda: use(read_rle_csv(folder)))


@given(image_bytes(".png"))
def fuzz_mask_folders(mask: bytes) -> None:
    from datasets.mask_folders import load_masks, read_mask_folders

    folder = _folder()
    tiny_image(folder / "a" / "images", "a.png")
    (folder / "a" / "masks").mkdir()
    (folder / "a" / "masks" / "0.png").write_bytes(mask)
    _expect_user_error(lambda: [load_masks(r, (HEIGHT, WIDTH)) for r in read_mask_folders(folder)])


@given(st.sampled_from([".tif", ".png"]).flatmap(lambda s: st.tuples(st.just(s), image_bytes(s))))
def fuzz_label_images(label: tuple[str, bytes]) -> None:
    from datasets.label_images import read_label_images

    suffix, data = label
    folder = _folder()
    tiny_image(folder, "a.png")
    (folder / f"a_masks{suffix}").write_bytes(data)
    _expect_user_error(lambda: use(read_label_images(folder)))


@given(st.sampled_from([".tif", ".png"]).flatmap(lambda s: st.tuples(st.just(s), image_bytes(s))))
def fuzz_images(image: tuple[str, bytes]) -> None:
    """The dataset readers' decoder (PIL) in every normalisation, and prediction's (tifffile for TIFF)."""
    suffix, data = image
    path = _folder() / f"a{suffix}"
    path.write_bytes(data)
    for mode in NORMALIZATIONS:
        _expect_user_error(lambda mode=mode: _rgb8(load_image(path, mode)))
    try:
        pixels = read_image(path).pixels
    except BadImage:
        return
    for mode in NORMALIZATIONS:
        _rgb8(normalize(pixels, mode))


def _rgb8(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, (image.dtype, image.shape)


def _nifti() -> bytes:
    import nibabel as nib

    path = _folder() / "v.nii"
    voxels = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), path)
    return path.read_bytes()


NIFTI = _nifti()
HEADER_FIELDS = {"dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "vox_offset": (108, "<f")}


@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(HEADER_FIELDS)), st.integers(0, 7), st.integers(-32768, 32767)),
        max_size=3,
    ),
    st.lists(st.tuples(st.integers(0, len(NIFTI) - 1), st.integers(0, 255)), max_size=3),
    st.booleans(),
    st.integers(0, len(NIFTI)),
)
def fuzz_nifti(fields, flips, gz, length) -> None:
    """load_volume on a small NIfTI whose header fields (dims, type, offset) and bytes are changed."""
    import gzip
    import struct

    from datasets.volumes import load_volume

    data = bytearray(NIFTI)
    for name, index, value in fields:
        offset, fmt = HEADER_FIELDS[name]
        values = list(struct.unpack_from(fmt, data, offset))
        values[index % len(values)] = value
        struct.pack_into(fmt, data, offset, *values)
    for offset, byte in flips:
        data[offset] = byte
    data = bytes(data[: max(length, 352)])
    path = _folder() / ("v.nii.gz" if gz else "v.nii")
    path.write_bytes(gzip.compress(data) if gz else data)
    _expect_user_error(lambda: load_volume(path).astype(np.uint8))


@given(
    st.one_of(
        st.text(max_size=20), st.binary(max_size=20), compressed_counts(), st.lists(hostile(), max_size=4)
    )
)
def fuzz_rle_decoder(counts) -> None:
    """rle_counts on anything; whatever it accepts for a 6x8 mask, pycocotools decodes to the same runs."""
    try:
        runs = rle_counts(counts, "fuzz")
    except UserError:
        return
    if runs.sum() != HEIGHT * WIDTH or not isinstance(counts, str | bytes):
        return
    text = counts.encode() if isinstance(counts, str) else counts
    mask = mask_utils.decode({"size": [HEIGHT, WIDTH], "counts": text})
    expected = np.repeat(np.arange(len(runs)) % 2, runs).reshape((HEIGHT, WIDTH), order="F")
    assert np.array_equal(mask, expected)


def _expect_user_error(action) -> None:
    try:
        action()
    except UserError:
        pass


TARGETS = {
    "coco": fuzz_coco,
    "via": fuzz_via,
    "rle-csv": fuzz_rle_csv,
    "mask-folders": fuzz_mask_folders,
    "label-images": fuzz_label_images,
    "images": fuzz_images,
    "nifti": fuzz_nifti,
    "rle-decoder": fuzz_rle_decoder,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz_readers")
    p.add_argument("target", choices=[*TARGETS, "cap-check"])
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--cap-gib", type=float, default=3.0)
    p.add_argument("--random", action="store_true", help="new examples each run (default: the same ones)")
    args = p.parse_args(argv)
    limit_memory(int(args.cap_gib * 2**30))
    if args.target == "cap-check":  # address space only, never touched: harmless if the cap did not hold
        np.empty(int((args.cap_gib + 1) * 2**30), dtype=np.uint8)
        return 0
    profile = settings(
        max_examples=args.examples,
        deadline=None,  # a hang is caught by the caller's timeout; a slow shared CPU must not fail a test
        derandomize=not args.random,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    with tempfile.TemporaryDirectory() as tmp:
        tempfile.tempdir = tmp  # every example's folder goes away with it
        profile(TARGETS[args.target])()
    print(f"{args.target}: {args.examples} examples, no exception other than UserError")
    return 0


if __name__ == "__main__":
    sys.exit(main())
