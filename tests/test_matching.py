"""Slice matching on real data: a library of the micro-CT shell plus 15 adrenal3d volumes (64^3 masks).

Queries are library slices cut at a known volume/axis/index, rotated counter-clockwise by a known angle
(skimage.transform.rotate, the convention of datasets.matching) and given Gaussian noise; the expected
match angle is therefore (-angle) % 360. What is measured: the top match's volume, axis, index (within
+-2, because neighbouring slices are near-identical) and angle (within +-10 degrees). Query indices lie in
the middle third of the object's extent along the axis, because end slices are tiny blobs whose
orientation and origin are ambiguous. Skips when ../shared/data is absent.
"""

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage.filters import threshold_otsu
from skimage.transform import rotate

from datasets import matching
from datasets.errors import UserError
from datasets.volumes import load_volume
from tests.helpers import SHARED_DATA

SHELL = SHARED_DATA / "microct_shell" / "shell_225x128x128.nii.gz"
ADRENAL = sorted((SHARED_DATA / "adrenal3d" / "volumes").glob("train_00*.nii.gz"))[:15]
ANGLES = (0, 35, 90, 160, 270)
NOISE_SIGMA = 15  # grey levels, on 0..255 images
pytestmark = pytest.mark.skipif(
    not SHELL.is_file() or len(ADRENAL) < 15, reason="needs shared/data/microct_shell and adrenal3d"
)


def _circular_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def _query(volume: np.ndarray, axis: int, index: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    """The slice rotated counter-clockwise by `angle` (canvas enlarged so nothing is cut), plus noise."""
    image = np.take(volume, index, axis=axis).astype(np.float32)
    image = rotate(image, angle, resize=True, order=1, preserve_range=True)
    return np.clip(image + rng.normal(0, NOISE_SIGMA, image.shape), 0, 255).astype(np.uint8)


def _middle_index(volume: np.ndarray, axis: int, rng: np.random.Generator) -> int:
    """An index in the middle third of the object's extent along `axis` (object: the volume's Otsu mask)."""
    foreground = volume > threshold_otsu(volume)
    present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
    lo, hi = present[0], present[-1]
    return int(lo + (hi - lo) * rng.uniform(1 / 3, 2 / 3))


@pytest.fixture(scope="module")
def library() -> matching.Library:
    start = time.perf_counter()
    lib = matching.build_library([SHELL, *ADRENAL])
    print(
        f"\nlibrary: {len(lib)} slices from {len(lib.names)} volumes in {time.perf_counter() - start:.2f} s"
    )
    return lib


def test_library_is_compact(library):
    n = len(library)
    assert library.thumbs.shape == (n, 64, 64) and library.thumbs.dtype == np.uint8
    assert library.masks.shape == (n, 64, 64) and library.masks.dtype == bool
    assert library.hu.shape == (n, 7) and np.isfinite(library.hu).all()
    assert set(np.unique(library.axes)) == {0, 1, 2}
    assert library.names[0] == SHELL.name


def test_hit_rate_on_rotated_noisy_slices(library):
    rng = np.random.default_rng(0)
    cases = [(SHELL, axis) for axis in range(3)] + [(p, i % 3) for i, p in enumerate(ADRENAL[:12])]
    hits, times, lines = 0, [], []
    for i, (path, axis) in enumerate(cases):
        volume = load_volume(path)
        index = _middle_index(volume, axis, rng)
        angle = ANGLES[i % len(ANGLES)]
        start = time.perf_counter()
        top = matching.match_slice(library, _query(volume, axis, index, angle, rng), top_k=3)[0]
        times.append(time.perf_counter() - start)
        expected_angle = (-angle) % 360
        hit = (
            top.volume == path.name
            and top.axis == axis
            and abs(top.index - index) <= 2
            and _circular_diff(top.angle, expected_angle) <= 10
        )
        hits += hit
        lines.append(
            f"{'hit ' if hit else 'MISS'} {path.name} axis {axis} index {index} rotated {angle} -> "
            f"{top.volume} axis {top.axis} index {top.index} angle {top.angle:.0f} (want {expected_angle}) "
            f"score {top.score:.2f} dice {top.dice:.2f} ssim {top.ssim:.2f} ncc {top.ncc:.2f} "
            f"orb {top.orb_matches}"
        )
    rate = hits / len(cases)
    print("\n" + "\n".join(lines))
    print(
        f"hit rate {rate:.0%} ({hits}/{len(cases)}), {np.mean(times):.2f} s per query, "
        f"library {len(library)} slices"
    )
    assert rate >= 0.8


@pytest.mark.parametrize("angle", [0, 90])
def test_angle_convention_on_a_clean_slice(library, angle):
    """An unrotated clean slice matches itself at angle 0; rotated 90 CCW it needs 270 CCW back."""
    volume = load_volume(SHELL)
    image = np.rot90(np.take(volume, 110, axis=0), k=angle // 90)  # rot90 is counter-clockwise
    top = matching.match_slice(library, image, top_k=1)[0]
    assert (top.volume, top.axis) == (SHELL.name, 0)
    assert abs(top.index - 110) <= 1
    assert _circular_diff(top.angle, (-angle) % 360) <= 2
    assert top.dice > 0.95 and top.ncc > 0.95


def test_restriction_by_volume(library):
    volume = load_volume(ADRENAL[3])
    image = _query(
        volume, 1, _middle_index(volume, 1, np.random.default_rng(1)), 35, np.random.default_rng(2)
    )
    only = matching.match_slice(library, image, top_k=5, volumes=[ADRENAL[3].name])
    assert {m.volume for m in only} == {ADRENAL[3].name}
    others = [ADRENAL[0].name, SHELL.name]
    elsewhere = matching.match_slice(library, image, top_k=5, volumes=others)
    assert {m.volume for m in elsewhere} <= set(others)
    assert elsewhere[0].score < only[0].score  # the right volume scores higher than the best wrong one


def test_results_are_sorted_and_well_formed(library):
    volume = load_volume(ADRENAL[5])
    image = _query(volume, 2, 32, 160, np.random.default_rng(3))
    matches = matching.match_slice(library, image, top_k=4, coarse=10)
    assert len(matches) == 4
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    for m in matches:
        assert 0 <= m.angle < 360 and m.axis in (0, 1, 2) and m.orb_matches >= 0
        assert 0 <= m.dice <= 1 and -1 <= m.ncc <= 1 and -1 <= m.ssim <= 1


def test_rgb_and_float_queries_are_accepted(library):
    image = np.take(load_volume(SHELL), 60, axis=1)
    rgb = np.repeat(image[..., None], 3, axis=2)
    for query in (rgb, image.astype(np.float64) / 255):
        top = matching.match_slice(library, query, top_k=1)[0]
        assert (top.volume, top.axis) == (SHELL.name, 1) and abs(top.index - 60) <= 2


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 0), np.uint8), "empty"),
        (np.full((40, 40), 7, np.uint8), "uniform"),
        (np.pad(np.full((2, 2), 255, np.uint8), 19), "no object"),  # 4 object pixels: too small
        (np.zeros((4, 5, 6, 7), np.uint8), "expected a 2D"),
    ],
)
def test_bad_queries_are_user_errors(library, image, message):
    with pytest.raises(UserError, match=message):
        matching.match_slice(library, image)


def test_unknown_volume_is_a_user_error(library):
    image = np.take(load_volume(SHELL), 110, axis=0)
    with pytest.raises(UserError, match=r"unknown volume.*nope\.nii\.gz"):
        matching.match_slice(library, image, volumes=["nope.nii.gz"])


def test_empty_library_and_bad_files_are_user_errors(tmp_path: Path):
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), empty)
    library = matching.build_library([empty])
    assert len(library) == 0
    with pytest.raises(UserError, match="no slices"):
        matching.match_slice(library, np.pad(np.full((20, 20), 255, np.uint8), 10))
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not a volume")
    with pytest.raises(UserError, match="broken.nii.gz"):
        matching.build_library([broken])
    with pytest.raises(UserError, match="no volumes"):
        matching.build_library([])
    with pytest.raises(UserError, match="unique"):
        matching.build_library([empty, empty])
    with pytest.raises(UserError, match="step"):
        matching.build_library([empty], step=0)
