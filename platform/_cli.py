"""What every `python -m platform.X` command shares: user errors as one line + exit 2, the embedded
MLflow store, and where local Ray results go."""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from datasets.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LOCAL_RESULTS = REPO / ".ray_results"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, tokens): ours are model
# training, and tagged so the UI lands on the runs.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def run(main: Callable[[list[str] | None], int]) -> None:
    """Run a CLI `main`; a UserError becomes one line on stderr and exit code 2, never a traceback."""
    # Long data work (slicing volumes, ...) logs progress lines with rate and ETA from datasets/*.
    progress = logging.getLogger("datasets")
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler())
        progress.setLevel(logging.INFO)
        progress.propagate = False
    try:
        code = main(None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def check_tta(value: str | None) -> None:
    """--tta of the detector CLIs: None (the model's own) or one of the config's TTA modes."""
    from trainers.config import TTA_MODES

    if value is not None and value not in TTA_MODES:
        raise UserError(f"--tta: expected one of {', '.join(TTA_MODES)}, got '{value}'")


def tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded SQLite store inside the checkout."""
    from deploy.registry import default_tracking_uri

    return cli_value or default_tracking_uri()


def model_folder(model: str, tracking: str | None) -> Path:
    """The local folder of a --model value: a folder as given, or a registered or logged model fetched
    through MLflow at `tracking` (--tracking-uri; default as tracking_uri)."""
    if ":/" in model:
        import mlflow

        uri = tracking_uri(tracking)
        mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the registry at this URI
        mlflow.set_registry_uri(uri)
    from deploy.registry import resolve

    return resolve(model)


def use_experiment(uri: str, name: str) -> str:
    """Point MLflow at `uri` and return the id of experiment `name`, creating it if needed.

    Tagged as model development (KIND_TAG). With a SQLite store, artifacts go beside the database file
    (.mlflow/artifacts/ for the embedded one) rather than MLflow's default ./mlruns in whatever folder the
    command was started from.
    """
    import mlflow  # here, not at the top: `platform.bench gpu` runs on GPU machines that have no MLflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if KIND_TAG not in experiment.tags:  # made before the tag existed: the UI would open on GenAI
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})


def browse_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)"
    return f"open {uri} in a browser"


def add_verbose(parser) -> None:
    """--verbose of the CLIs that start Ray (trainers/console.py)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Tune's and the workers' full output here (default: one line per epoch on the "
        "console, everything in the run's log file, whose path is printed)",
    )


def log_file(storage: str, name: str) -> Path:
    """The full console output of run or search `name`: in its folder under a local storage path, else (a
    storage URI, where the driver cannot append) under .ray_results/logs/ here."""
    if "://" in storage:
        return LOCAL_RESULTS / "logs" / f"{name}.log"
    return Path(storage) / name / "console.log"


def storage_path(value: str | None) -> str:
    """--storage-path: a local folder made absolute (workers run elsewhere), or a URI such as s3://...
    that is checked here, so that a wrong bucket or missing credentials is one line, not a Ray traceback."""
    if not value:
        return str(LOCAL_RESULTS)
    if "://" not in value:
        return str(Path(value).expanduser().resolve())
    from trainers.ray_seam import storage_filesystem

    try:
        filesystem, path = storage_filesystem(value)
        filesystem.create_dir(path)
    except (OSError, ValueError) as e:  # pyarrow: OSError for storage errors, ArrowInvalid for bad URIs
        hint = ""
        if value.startswith("s3://"):
            hint = (
                " (credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the machine's role; "
                "an S3-compatible store other than AWS needs AWS_ENDPOINT_URL)"
            )
        raise UserError(f"--storage-path {value}: {str(e).splitlines()[0]}{hint}") from None
    return value


def base_config(recipe: str, data: str | None, overrides: list[str], max_epochs: int | None = None):
    """Recipe < --data/--max-epochs < key=value overrides, with every path made absolute on the driver
    (workers run in another folder); the data is read once here so that its errors are one line."""
    from datasets.instances import SAMPLE_DATA, read_records
    from datasets.slices import SAMPLE_VOLUMES, slice_index, split_rows
    from datasets.splits import train_val_split
    from trainers.classification.model import check_model_name
    from trainers.config import ClassifierConfig, apply_overrides, parse_overrides
    from trainers.recipes import get_recipe

    cfg = get_recipe(recipe)
    values = parse_overrides(overrides)
    if data:
        folder = Path(data).expanduser().resolve()
        if not folder.exists():
            raise UserError(f"--data: {data} not found")
        values["data"] = str(folder)
    for key in ("split_file", "weights", "pretrained"):
        value = values.get(key)
        if value and value not in ("DEFAULT", "timm") and os.path.exists(os.path.expanduser(value)):
            values[key] = str(Path(value).expanduser().resolve())
    if max_epochs is not None:
        values["epochs"] = max_epochs
    cfg = apply_overrides(cfg, values)
    if isinstance(cfg, ClassifierConfig):
        # Volumes are sliced here, once, into the cache; workers (and the logged config) get the slice index.
        check_model_name(cfg.model_name)
        index = slice_index(cfg.data or SAMPLE_VOLUMES, cfg.slicing())
        split_rows(index, cfg.val_fraction, cfg.split_seed)
        return apply_overrides(cfg, {"data": str(index)})
    train_val_split(
        read_records(cfg.data or SAMPLE_DATA, cfg.data_format), cfg.val_fraction, cfg.seed, cfg.split_file
    )
    return cfg
