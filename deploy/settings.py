"""What the Serve application serves and how (ServeSettings): the `args` of a Serve config file
(deploy/serve.yaml) or the flags of `python -m platform.serve`, checked before anything starts."""

from dataclasses import dataclass

from datasets.errors import UserError
from deploy.registry import default_tracking_uri
from trainers.config import from_dict


@dataclass
class ServeSettings:
    """What the application serves and how; the `args` of a Serve config file, or platform.serve flags."""

    detector: str = ""  # models:/NAME@alias or models:/NAME/VERSION; "" = no /v1/segment
    classifier: str = ""  # a registered classifier or ensemble; "" = no /v1/classify
    library: str = ""  # a folder of NIfTI volumes to find slices in; "" = no /v1/match
    library_step: int = 1  # every n-th slice of each axis goes into the library
    tracking_uri: str = ""  # MLflow store holding the registry; "" = MLFLOW_TRACKING_URI or .mlflow/
    detector_replicas: int = 1
    classifier_replicas: int = 1
    cpus_per_replica: float = 1.0  # per model replica (torch uses this many threads)
    gpus_per_replica: float = 0.0  # per model replica; a fraction lets replicas share a GPU
    max_batch_size: int = 8  # tiles or slices per model call (@serve.batch); 1 = no batching
    # How long a partial batch waits for more. Short: a lone request pays all of it, while under load the
    # next batch fills from the requests that queued during the previous one anyway.
    batch_wait_timeout_s: float = 0.002
    max_upload_mb: float = 256.0  # request bodies over this are 413
    max_pixels: int = 150_000_000  # decoded image pixels (a 12k x 12k mosaic); over: 413
    max_voxels: int = 1024**3  # decoded NIfTI voxels; over: 413
    reload_on_alias: bool = False  # follow an alias (champion) to new versions without a restart
    reload_interval_s: float = 10.0  # how often the alias is checked

    def validate(self) -> None:
        if not (self.detector or self.classifier or self.library):
            raise UserError(
                "serve: nothing to serve; give a detector and/or a classifier (models:/NAME@alias) "
                "and/or a library folder"
            )
        positive = ("detector_replicas", "classifier_replicas", "max_batch_size", "max_pixels", "max_voxels")
        for key in (*positive, "library_step"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected at least 1, got {getattr(self, key)}")
        for key in ("cpus_per_replica", "gpus_per_replica", "batch_wait_timeout_s"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        for key in ("max_upload_mb", "reload_interval_s"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}: expected a positive number, got {getattr(self, key)}")


def settings_from(args: dict, source: str = "args") -> ServeSettings:
    """ServeSettings from a dict (a Serve config's `args`), unknown or ill-typed keys named; the tracking
    URI made explicit here, so replicas elsewhere use the store the application was built against."""
    return from_dict(
        ServeSettings, {**args, "tracking_uri": args.get("tracking_uri") or default_tracking_uri()}, source
    )
