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


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """A temporary MLflow store with the small detector and classifier of tests/serving.py registered."""
    from tests.serving import register_models

    return register_models(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`python -m platform.serve` over `store` with a slice library (the shell and three adrenal volumes),
    its settings from a copy of deploy/serve.yaml. One per test module, stopped at its end: a server left
    running would be a second local Ray beside the next tests' own (see trainers.ray_seam.init_ray)."""
    from tests.serving import ADRENAL, CLASSIFIER, DETECTOR, SHELL, library_folder, served_config
    from tests.serving import start_server as start

    root = tmp_path_factory.mktemp("server")
    config = served_config(
        root,
        detector=f"models:/{DETECTOR}@champion",
        classifier=f"models:/{CLASSIFIER}@champion",
        library=str(library_folder(root / "library", [SHELL, *ADRENAL[:3]])),
        max_upload_mb=1,
        reload_on_alias=True,
        reload_interval_s=1,
    )
    server = start(store, "--config", str(config), log=root / "serve.log")
    yield server
    server.stop()
