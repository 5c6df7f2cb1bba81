from pathlib import Path

import pytest

from tests.helpers import SAMPLE


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Four real nucleus images from the bundled sample, copied into a fresh mask-folders tree."""
    import shutil

    root = tmp_path / "tiny"
    root.mkdir()
    for folder in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:4]:
        shutil.copytree(folder, root / folder.name)
    return root
