"""The one champion rule and the one model resolver (deploy/champion.py, deploy/registry.py) on a real MLflow
store: the alias is read again before it is set, --force-champion moves it with both numbers shown, every
model reference resolves to a local folder or fails with one line naming it, and `platform.train
--register-as` keeps a better champion (real local Ray, real CLI runs)."""

import mlflow
import pytest

from datasets.errors import UserError
from tests.helpers import mlflow_uris_restored, run_cli

FILES = ("model.pt", "config.json", "categories.json")


@pytest.fixture
def store(tmp_path):
    """An MLflow store in tmp_path as the active one, and the URI of a model logged in it (a detector
    checkpoint folder whose files are never loaded here: the rule and the resolver only move folders)."""
    from deploy.registry import log_checkpoint
    from platform._cli import use_experiment

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text("{}")
    with mlflow_uris_restored():
        experiment = use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "champion")
        with mlflow.start_run(experiment_id=experiment) as run:
            model_uri = log_checkpoint(folder).model_uri
        yield model_uri, run.info.run_id, folder


def never(model_uri: str) -> dict:
    raise AssertionError(f"{model_uri} evaluated although its registered number was on the same data")


def test_alias_is_read_again_before_it_is_set(store):
    """A better model registered while the champion was being re-evaluated (another search finishing) is
    compared with too: the candidate beats the old champion but not the new one, and the alias stays."""
    from deploy.champion import ALIAS, Validation, current_champion, register_candidate

    model_uri, _, _ = store
    first = register_candidate(model_uri, "m", Validation("elsewhere", never), "segm_AP", "max", 0.2)
    assert first.promoted and first.champion_version is None
    arrived = mlflow.register_model(model_uri, "m")  # another search's model, better on our data
    client = mlflow.MlflowClient()
    client.set_model_version_tag("m", arrived.version, "val_data", "ours")
    client.set_model_version_tag("m", arrived.version, "val_segm_AP", "0.9")
    evaluated = []

    def evaluate(uri: str) -> dict:
        evaluated.append(uri)
        client.set_registered_model_alias("m", ALIAS, arrived.version)  # meanwhile, the other search
        return {"segm_AP": 0.1}

    late = register_candidate(model_uri, "m", Validation("ours", evaluate), "segm_AP", "max", 0.5)
    assert evaluated == ["models:/m/1"]  # the old champion, on other data: re-evaluated once
    assert not late.promoted and late.champion_version == "2" and late.champion_value == 0.9
    assert str(current_champion("m").version) == "2"
    assert "segm_AP=0.5000 does not beat champion version 2: segm_AP=0.9000" in late.message("segm_AP", 0.5)


def test_force_moves_the_alias_and_shows_both_numbers(store):
    from deploy.champion import Validation, current_champion, register_candidate

    model_uri, _, _ = store
    register_candidate(model_uri, "m", Validation("ours", never), "val_loss", "min", 0.3)
    kept = register_candidate(model_uri, "m", Validation("ours", never), "val_loss", "min", 0.4)
    assert not kept.promoted and str(current_champion("m").version) == "1"
    forced = register_candidate(model_uri, "m", Validation("ours", never), "val_loss", "min", 0.4, force=True)
    assert forced.promoted and forced.forced and str(current_champion("m").version) == "3"
    message = forced.message("val_loss", 0.4)
    assert (
        "version=3 alias=champion (--force-champion: val_loss=0.4000 does not beat champion version 1"
        in message
    )
    assert "val_loss=0.3000 (as registered, same validation data)" in message
    better = register_candidate(model_uri, "m", Validation("ours", never), "val_loss", "min", 0.1, force=True)
    assert better.promoted and not better.forced  # forcing a better model is an ordinary promotion
    assert "val_loss=0.1000 beats champion version 3" in better.message("val_loss", 0.1)


def test_every_reference_resolves_to_one_local_folder(store, tmp_path):
    from deploy.registry import register, resolve

    model_uri, run_id, folder = store
    register(model_uri, "m")
    assert resolve(str(folder)) == folder.resolve()
    for value in ("models:/m@champion", "models:/m/1", f"runs:/{run_id}/model", model_uri):
        local = resolve(value)
        assert local.name == "checkpoint" and sorted(p.name for p in local.iterdir()) == sorted(FILES), value
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/m/1", dst_path=str(tmp_path / "dl")
    )
    assert resolve(downloaded).parent.parent == tmp_path / "dl"  # a local MLflow model folder


def test_bad_references_are_one_line_naming_them(store, tmp_path):
    from deploy.registry import classifier_folder, resolve

    _, _, folder = store

    def error(value: str, flag: str = "--model", how=resolve) -> str:
        with pytest.raises(UserError) as caught:
            how(value, flag)
        return str(caught.value)

    missing = tmp_path / "nope"
    assert error(str(missing)).startswith(f"--model: {missing} not found; expected a checkpoint folder")
    assert error(str(folder / "model.pt")).startswith(f"--model: {folder / 'model.pt'} is a file")
    assert error("models:/nope@champion", "--models").startswith(
        "--models: cannot load models:/nope@champion"
    )
    assert error(str(folder), how=classifier_folder) == (
        f"--model: {folder} is a Mask R-CNN, not a slice classifier or ensemble"
    )
    (folder / "categories.json").unlink()
    assert error(str(folder)).startswith(f"--model: {folder / 'categories.json'} not found")


OVERRIDES = ["min_size=128", "max_size=160", "anchor_sizes=8,16,32,64,128", "batch_size=1", "phases=1:0"]


def train(data, uri: str, tmp_path, *extra: str):
    return run_cli(
        "platform.train", "--recipe", "dsb2018_demo", "--data", str(data), "--tracking-uri", uri,
        "--experiment", "champion", "--storage-path", str(tmp_path / "ray"), "--register-as", "m",
        *extra, *OVERRIDES, "epochs=1",
    )  # fmt: skip


def test_train_keeps_a_better_champion_unless_forced(tiny_dataset, tmp_path):
    """The champion: a checkpoint registered through the rule as measured on exactly the validation images
    the CLI's runs measure on (its registered number, a perfect 1.0, is what they are compared with)."""
    from deploy.champion import register_candidate
    from platform._cli import base_config, use_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = base_config("dsb2018_demo", str(tiny_dataset), [*OVERRIDES, "epochs=1"])
    folder = tmp_path / "champion"
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text("{}")
    with mlflow_uris_restored():
        with mlflow.start_run(experiment_id=use_experiment(uri, "champion")):
            register_candidate(folder, "m", cfg, "segm_AP", "max", 1.0)

    kept = train(tiny_dataset, uri, tmp_path)
    assert kept.returncode == 0, kept.stdout[-4000:] + kept.stderr[-4000:]
    assert "registered model: name=m version=2 without alias champion: segm_AP=" in kept.stdout
    assert (
        "does not beat champion version 1: segm_AP=1.0000 (as registered, same validation data)"
        in kept.stdout
    )
    client = mlflow.MlflowClient(uri)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"

    forced = train(tiny_dataset, uri, tmp_path, "--force-champion")
    assert forced.returncode == 0, forced.stdout[-4000:] + forced.stderr[-4000:]
    assert "registered model: name=m version=3 alias=champion (--force-champion: segm_AP=" in forced.stdout
    assert "champion version 1: segm_AP=1.0000" in forced.stdout
    champion = client.get_model_version_by_alias("m", "champion")
    assert str(champion.version) == "3" and champion.tags["metric"] == "segm_AP"
    run = client.search_runs([client.get_experiment_by_name("champion").experiment_id])[0]
    assert champion.run_id == run.info.run_id  # the newest run's own logged model
