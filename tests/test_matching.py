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

from datasets import matching
from datasets.errors import UserError
from datasets.matching_eval import (
    circular_diff,
    make_queries,
    middle_index,
    rotated_query,
    run_queries,
    summary,
)
from datasets.volumes import load_volume
from tests.helpers import SHARED_DATA

SHELL = SHARED_DATA / "microct_shell" / "shell_225x128x128.nii.gz"
ADRENAL = sorted((SHARED_DATA / "adrenal3d" / "volumes").glob("train_00*.nii.gz"))[:15]
pytestmark = pytest.mark.skipif(
    not SHELL.is_file() or len(ADRENAL) < 15, reason="needs shared/data/microct_shell and adrenal3d"
)


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
    # the shell along each axis, and 12 adrenal volumes (each along one axis)
    queries = make_queries([SHELL, SHELL, SHELL, *ADRENAL[:12]])
    outcomes = run_queries(library, queries)
    rate, seconds = summary(outcomes)
    print("\n" + "\n".join(o.line() for o in outcomes))
    print(f"hit rate {rate:.0%} of {len(outcomes)}, {seconds:.2f} s per query, library {len(library)} slices")
    assert rate >= 0.8


def test_hit_rate_and_time_against_library_size(library):
    """The same queries against the library restricted to 2, 6 and all 16 volumes (a restriction ranks
    only those volumes' slices: the same work as a library of them). The report is printed; more
    volumes mean more look-alike slices, so the hit rate may fall but must stay >= 80 %."""
    queries = make_queries([SHELL, SHELL, SHELL, ADRENAL[0], ADRENAL[0]], seed=1)  # all in the 2 volumes
    report = []
    for n in (2, 6, 16):
        volumes = library.names[:n]
        slices = int(np.isin(library.volume_ids, range(n)).sum())
        rate, seconds = summary(run_queries(library, queries, volumes))
        report.append(f"{n:>3} volumes {slices:>5} slices: hit rate {rate:4.0%}, {seconds:.2f} s per query")
        assert rate >= 0.8, report
    print("\n" + "\n".join(report))


@pytest.mark.parametrize("angle", [0, 90])
def test_angle_convention_on_a_clean_slice(library, angle):
    """An unrotated clean slice matches itself at angle 0; rotated 90 CCW it needs 270 CCW back."""
    volume = load_volume(SHELL)
    image = np.rot90(np.take(volume, 110, axis=0), k=angle // 90)  # rot90 is counter-clockwise
    top = matching.match_slice(library, image, top_k=1)[0]
    assert (top.volume, top.axis) == (SHELL.name, 0)
    assert abs(top.index - 110) <= 1
    assert circular_diff(top.angle, (-angle) % 360) <= 2
    assert top.dice > 0.95 and top.ncc > 0.95


def test_restriction_by_volume(library):
    volume = load_volume(ADRENAL[3])
    image = rotated_query(
        volume, 1, middle_index(volume, 1, np.random.default_rng(1)), 35, np.random.default_rng(2)
    )
    only = matching.match_slice(library, image, top_k=5, volumes=[ADRENAL[3].name])
    assert {m.volume for m in only} == {ADRENAL[3].name}
    others = [ADRENAL[0].name, SHELL.name]
    elsewhere = matching.match_slice(library, image, top_k=5, volumes=others)
    assert {m.volume for m in elsewhere} <= set(others)
    assert elsewhere[0].score < only[0].score  # the right volume scores higher than the best wrong one


def test_results_are_sorted_and_well_formed(library):
    volume = load_volume(ADRENAL[5])
    image = rotated_query(volume, 2, 32, 160, np.random.default_rng(3))
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
