"""Property-based fuzzing of the upload decoders (deploy/inputs.py) with Hypothesis, in process and under
an address-space cap: for any bytes (random, or valid PNG/TIFF/NIfTI files with header fields set to
anything and bytes flipped or cut), decode_image and decode_volume return pixels within the limits or
raise BadInput with a 4xx status; never another exception, and never more memory than the cap allows."""

import contextlib
import gzip
import io
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deploy.inputs import BadInput, decode_image, decode_volume
from tests.test_serve_inputs import nifti_bytes

MAX_PIXELS = 2**20
MAX_BYTES = 8 * 2**20
HEADROOM = 1 << 30  # address space the decoders may add while fuzzed: a blow-up fails, not the machine
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on corrupt TIFF tags and EXIF
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def memory_cap():
    """RLIMIT_AS set to this process's current size + HEADROOM for the block (Linux)."""
    size = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int(size.split()[1]) * 1024 + HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


_rng = np.random.default_rng(0)
IMAGE_SEEDS = [
    encoded(_rng.integers(0, 255, (12, 10, 3), np.uint8), "PNG"),
    encoded(_rng.integers(0, 65535, (9, 7), np.uint16), "PNG"),
    encoded(_rng.integers(0, 65535, (9, 7), np.uint16), "TIFF"),
    encoded(_rng.random((8, 6), np.float32), "TIFF"),
    encoded(_rng.integers(0, 255, (8, 8, 4), np.uint8), "TIFF"),
]
VOLUME_SEEDS = [
    nifti_bytes(_rng.integers(0, 255, (5, 4, 3), np.uint8)),
    nifti_bytes(_rng.random((4, 4, 4))),
    gzip.compress(nifti_bytes(_rng.integers(0, 4000, (6, 5, 4), np.int16))),
]


def png_with_header(width: int, height: int, depth: int, colour: int, rest: bytes) -> bytes:
    """A PNG signature and an IHDR chunk (CRC right) declaring anything, then `rest`."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + rest


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few bytes set to anything (headers first: most positions drawn near the start)
    and perhaps cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        end = draw(st.sampled_from([min(len(data), 64), min(len(data), 400), len(data)]))
        data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@st.composite
def nifti_headers(draw) -> bytes:
    """A NIfTI-1 file whose shape, voxel type, offset and scaling are drawn freely."""
    dims = draw(st.lists(st.integers(-(2**15), 2**15 - 1), min_size=8, max_size=8))
    fields = {
        "dim": dims,
        "datatype": draw(
            st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 2304])
        ),
        "vox_offset": draw(st.one_of(st.just(352), st.integers(0, 2**31 - 1))),
        "scl_slope": draw(st.floats(allow_nan=True, allow_infinity=True, width=32)),
        "scl_inter": draw(st.floats(allow_nan=True, allow_infinity=True, width=32)),
    }
    body = nifti_bytes(np.zeros((4, 4, 4), np.uint8), **fields)
    body += draw(st.binary(max_size=512))
    return gzip.compress(body) if draw(st.booleans()) else body


def check_image(data: bytes) -> None:
    try:
        pixels = decode_image(data, MAX_PIXELS, MAX_BYTES)
    except BadInput as e:
        assert 400 <= e.status < 500 and str(e)
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS


def check_volume(data: bytes) -> None:
    try:
        volume = decode_volume(data, MAX_PIXELS, MAX_BYTES)
    except BadInput as e:
        assert 400 <= e.status < 500 and str(e) and "/tmp" not in str(e)
        return
    assert volume.dtype == np.uint8 and volume.ndim == 3 and volume.size <= MAX_PIXELS


@pytest.mark.parametrize("seed", IMAGE_SEEDS + VOLUME_SEEDS, ids=lambda b: b[:4].hex())
def test_the_seeds_decode(seed):
    decode = decode_volume if seed in VOLUME_SEEDS else decode_image
    assert decode(seed, MAX_PIXELS, MAX_BYTES).dtype == np.uint8


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated(IMAGE_SEEDS)))
def test_any_bytes_as_an_image(data):
    with memory_cap():
        check_image(data)


@FUZZ
@given(
    st.builds(
        png_with_header,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.sampled_from([0, 1, 2, 4, 8, 16, 32]),
        st.sampled_from([0, 2, 3, 4, 6, 7]),
        st.binary(max_size=256),
    )
)
def test_any_png_header(data):
    with memory_cap():
        check_image(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated(VOLUME_SEEDS), nifti_headers()))
def test_any_bytes_as_a_volume(data):
    with memory_cap():
        check_volume(data)
