"""Every dataset reader and decoder fuzzed with Hypothesis (tests/fuzz_readers.py), each in its own
subprocess under an address-space cap and a timeout: another exception, a crash (a signal), a blow-up
past the cap or a hang fails the test instead of taking the machine down."""

import os
import subprocess
import sys

import pytest

from tests.fuzz_readers import TARGETS
from tests.helpers import REPO

CAP_GIB = 3  # the readers' own imports take ~100 MB; a NaN polygon asked pycocotools for ~24 GB


def _fuzz(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }  # no thread arenas under the cap
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz_readers", *args, "--cap-gib", str(CAP_GIB)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_the_memory_cap_trips():
    """Reserving (not touching) more than the cap fails: the cap is real, so a blow-up in a reader fails."""
    out = _fuzz("cap-check", timeout=60)
    assert out.returncode != 0 and "MemoryError" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reader_gives_a_result_or_one_clear_error(target):
    out = _fuzz(target, "--examples", "200")
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reader_fuzzed_longer_with_new_examples(target):
    out = _fuzz(target, "--examples", "3000", "--random", timeout=1800)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
