from pathlib import Path

import pytest

from tests.helpers import sample_subset


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Four real nucleus images from the bundled sample, copied into a fresh mask-folders tree."""

    root = tmp_path / "tiny"
    root.mkdir()
    sample_subset(root, 4)
    return root
