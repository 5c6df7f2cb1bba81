"""User mistakes give one clear line on stderr and exit code 2, never a traceback."""

import pytest

from tests.helpers import run_cli


def _assert_user_error(out, *needles: str) -> None:
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_data_path(tmp_path):
    _assert_user_error(
        run_cli("platform.tune", "--space", "rpn_anchors", "--data", str(tmp_path / "nope")),
        "--data",
        "nope",
        "not found",
    )


def test_empty_dataset(tmp_path):
    _assert_user_error(
        run_cli("platform.tune", "--space", "rpn_anchors", "--data", str(tmp_path)),
        str(tmp_path),
        "empty dataset",
    )


def test_image_folder_without_image(tmp_path):
    (tmp_path / "abc" / "masks").mkdir(parents=True)
    _assert_user_error(
        run_cli("platform.tune", "--space", "rpn_anchors", "--data", str(tmp_path)),
        "abc/images/abc.png",
        "image not found",
    )


def test_unknown_space():
    _assert_user_error(run_cli("platform.tune", "--space", "nonsense"), "nonsense", "rpn_anchors")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("lr_rate=0.1", ("lr_rate", "unknown config key", "did you mean")),
        ("lr=fast", ("'lr'", "expects a number", "fast")),
        ("anchor_sizes=8,16,x", ("anchor_sizes", "comma-separated list of int")),
        ("epochs=2.5", ("epochs", "integer")),
        ("backbone=vgg", ("backbone", "vgg", "resnet18_fpn")),
        ("noequals", ("noequals", "key=value")),
    ],
)
def test_bad_override(override, needles):
    _assert_user_error(run_cli("platform.tune", "--space", "rpn_anchors", override), *needles)


def test_unknown_recipe():
    _assert_user_error(
        run_cli("platform.tune", "--space", "rpn_anchors", "--recipe", "nope"), "nope", "dsb2018_demo"
    )


def test_help_and_list_spaces():
    out = run_cli("platform.tune", "--space", "rpn_anchors", "--help")
    assert out.returncode == 0 and "--num-samples" in out.stdout
    out = run_cli("platform.tune", "--list-spaces")
    names = [line.split()[0] for line in out.stdout.splitlines()]
    spaces = ["augment", "backbone", "classifier", "mask_head", "optimizer", "roi_heads", "rpn_anchors"]
    assert out.returncode == 0 and names == sorted([*spaces, "thresholds"])  # sorted, one line each
    assert "(recipe adrenal3d_cpu)" in out.stdout and "(recipe dsb2018_demo)" in out.stdout
    assert "thresholds" in out.stdout and "cached predictions" in out.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--searcher", "bayes"], ["--searcher", "bayes", "tpe"]),
        (["--scheduler", "hyperband"], ["--scheduler", "asha"]),
        (["--metric", "segm_AP,kaggle_mAP", "--mode", "max"], ["--mode", "one mode per --metric"]),
        (["--mode", "up"], ["--mode", "max or min"]),
        (["--searcher", "grid"], ["--searcher grid", "trials", "key=value"]),
        (["--space", "optimizer", "--searcher", "grid"], ["conditional", "tpe or random"]),
        (["--num-samples", "0"], ["--num-samples", "positive"]),
        (["--storage-path", "nope://x/ray"], ["--storage-path nope://x/ray: ", "Unrecognized filesystem"]),
    ],
)
def test_search_flag_errors(args, needles):
    argv = ["--space", "rpn_anchors", *args] if "--space" not in args else args
    _assert_user_error(run_cli("platform.tune", *argv), *needles)


def test_resume_unknown_search(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = run_cli("platform.tune", "--resume", "nope-1", "--tracking-uri", uri)
    _assert_user_error(out, "--resume", "no search named 'nope-1'")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--resume", "deadbeef"], ["--resume", "no MLflow run 'deadbeef'"]),
        (["--resume", "deadbeef", "epochs=3"], ["--resume", "keeps its config"]),
        (["--seeds", "0"], ["--seeds", "positive integer"]),
        (["tile_size=16"], ["tile_size", ">= 32 pixels"]),
        (["--storage-path", "nope://x/ray"], ["--storage-path nope://x/ray: ", "Unrecognized filesystem"]),
        (["--force-champion"], ["--force-champion", "needs --register-as"]),
    ],
)
def test_train_resume_seeds_and_tile_mistakes(tmp_path, args, needles):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _assert_user_error(run_cli("platform.train", "--tracking-uri", uri, *args), *needles)
