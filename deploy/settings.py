"""What the Serve application serves and how (ServeSettings): the `args` of a Serve config file
(deploy/serve.yaml) or the flags of `python -m platform.serve`, checked before anything starts."""

from dataclasses import dataclass
from pathlib import Path

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
    max_upload_mb: float = 256.0  # request bodies (raw or multipart) over this are 413
    max_pixels: int = 150_000_000  # decoded image pixels (a 12k x 12k mosaic); over: 413
    max_voxels: int = 1024**3  # decoded NIfTI voxels; over: 413
    # Decoded bytes, from the header before decoding: image pixels x channels x bytes per sample, volume
    # voxels x bytes per voxel; over: 413. Scaling a volume to 8 bits holds about 2-2.5x this at its peak.
    max_decoded_mb: float = 1024.0
    # A detector pastes each of its box_detections_per_img masks at the full size of the image or tile it
    # ran on, in float32: that many x pixels x 4 bytes must fit in this, else 413 (a whole image: ask for
    # tile_size) or 422 (a tile_size too large). A batch holds up to max_batch_size such tiles.
    max_mask_mb: float = 2048.0
    max_tiles: int = 5000  # tiles one /v1/segment may run (150 MP in 256-px tiles is ~4100); over: 413
    # Host headers answered (any port), "*" for any; others get 400, so a DNS-rebinding page cannot read
    # the API. Add the name clients use when listening on another interface.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
    # A file holding the bearer token /v1/ requests must send (Authorization: Bearer TOKEN); "" = the
    # FORAM_SERVE_TOKEN environment variable, if set, else no authentication.
    auth_token_file: str = ""
    reload_on_alias: bool = False  # follow an alias (champion) to new versions without a restart
    reload_interval_s: float = 10.0  # how often the alias is checked

    def validate(self) -> None:
        if not (self.detector or self.classifier or self.library):
            raise UserError(
                "serve: nothing to serve; give a detector and/or a classifier (models:/NAME@alias) "
                "and/or a library folder"
            )
        positive = ("detector_replicas", "classifier_replicas", "max_batch_size", "max_pixels", "max_voxels")
        for key in (*positive, "max_tiles", "library_step"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected at least 1, got {getattr(self, key)}")
        for key in ("cpus_per_replica", "gpus_per_replica", "batch_wait_timeout_s"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: expected 0 or more, got {getattr(self, key)}")
        for key in ("max_upload_mb", "max_decoded_mb", "max_mask_mb", "reload_interval_s"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}: expected a positive number, got {getattr(self, key)}")


def settings_from(args: dict, source: str = "args") -> ServeSettings:
    """ServeSettings from a dict (a Serve config's `args`), unknown or ill-typed keys named; the tracking
    URI and token file made explicit here, so replicas elsewhere use what the application was built with."""
    explicit = {"tracking_uri": args.get("tracking_uri") or default_tracking_uri()}
    if args.get("auth_token_file"):
        explicit["auth_token_file"] = str(Path(str(args["auth_token_file"])).expanduser().resolve())
    return from_dict(ServeSettings, {**args, **explicit}, source)


def mb(value: float) -> int:
    """A limit in MB (MiB, as max_upload_mb has always meant) in bytes."""
    return int(value * 2**20)
