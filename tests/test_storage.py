"""--storage-path in object storage, against a real S3 server (moto's, on 127.0.0.1): the URI is checked up
front with one-line errors, and Ray checkpoints there are downloaded to a local folder, while a checkpoint
on a local or mounted filesystem is used in place. No Ray cluster (tests/test_faults.py trains with
checkpoints in S3; tests/test_cluster.py resumes a trial on another node from them)."""

import filecmp

import pyarrow.fs
import pytest

from datasets.errors import UserError
from platform import _cli
from tests.cluster_fixtures import S3Store, s3_store
from trainers.ray_seam import checkpoint_at, checkpoint_folder, experiment_path, storage_filesystem


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> S3Store:
    with s3_store(tmp_path_factory.mktemp("s3")) as running:
        yield running


@pytest.fixture
def s3_env(store, monkeypatch) -> S3Store:
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    return store


def test_a_reachable_bucket_is_accepted_as_given(s3_env):
    uri = f"s3://{s3_env.bucket}/ray"
    assert _cli.storage_path(uri) == uri
    filesystem, path = storage_filesystem(uri)
    assert filesystem.type_name == "s3" and path == f"{s3_env.bucket}/ray"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://no-such-bucket/ray", "Bucket 'no-such-bucket' not found"),
        ("nope://somewhere/ray", "Unrecognized filesystem type"),
    ],
)
def test_an_unusable_storage_uri_is_one_line_naming_it(s3_env, uri, expected):
    with pytest.raises(UserError) as e:
        _cli.storage_path(uri)
    message = str(e.value)
    assert message.startswith(f"--storage-path {uri}: ") and expected in message
    assert "\n" not in message
    assert ("AWS_ENDPOINT_URL" in message) == uri.startswith("s3://")  # the hint only where it helps


def test_unreachable_endpoint_is_one_line(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(UserError, match=r"^--storage-path s3://x-bucket/ray: .*127\.0\.0\.1"):
        _cli.storage_path("s3://x-bucket/ray")


def test_a_local_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli.storage_path("results") == str(tmp_path / "results")


def test_experiment_path_keeps_a_query_at_the_end():
    assert experiment_path("/shared/ray/", "search-1") == "/shared/ray/search-1"
    assert experiment_path("s3://b/ray", "search-1") == "s3://b/ray/search-1"
    assert (
        experiment_path("s3://b/ray?endpoint_override=h:9000&scheme=http", "s")
        == "s3://b/ray/s?endpoint_override=h:9000&scheme=http"
    )


def _checkpoint(folder):
    (folder / "sub").mkdir(parents=True)
    (folder / "model.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "config.json").write_text('{"epochs": 3}')
    return folder


def test_a_checkpoint_in_s3_is_downloaded(s3_env, tmp_path):
    local = _checkpoint(tmp_path / "written")
    uri = f"s3://{s3_env.bucket}/ray"
    filesystem, root = storage_filesystem(uri)
    remote = f"{root}/run/checkpoint_000002"
    pyarrow.fs.copy_files(str(local), remote, destination_filesystem=filesystem)
    objects = [key for key in s3_env.keys("ray/run/") if not key.endswith("/")]  # not pyarrow's dir markers
    assert sorted(objects) == [
        "ray/run/checkpoint_000002/model.pt",
        "ray/run/checkpoint_000002/sub/config.json",
    ]

    folder = checkpoint_folder(checkpoint_at(uri, remote), tmp_path / "download")
    assert folder.is_relative_to(tmp_path / "download")
    compared = filecmp.dircmp(local, folder)
    assert not compared.left_only and not compared.right_only and not compared.diff_files
    assert filecmp.cmp(local / "sub" / "config.json", folder / "sub" / "config.json", shallow=False)


def test_a_local_checkpoint_is_used_in_place(tmp_path):
    local = _checkpoint(tmp_path / "ray" / "run" / "checkpoint_000001")
    folder = checkpoint_folder(checkpoint_at(str(tmp_path / "ray"), str(local)), tmp_path / "download")
    assert folder == local
    assert not (tmp_path / "download").exists()
