"""The trial functions Ray Tune runs: a Ray Train run of one config, or one evaluation of post-processing
thresholds on cached validation predictions. Tune's trial processes import this module (and the package's
empty __init__) only, so it imports what the trials run and nothing of the driver (MLflow, Optuna, plots)."""

from pathlib import Path

from trainers.detection.postprocess import POSTPROCESS_FIELDS
from trainers.detection.thresholds import PredictionCache, evaluate_thresholds, load_cache
from trainers.ray_seam import report_trial
from trainers.tasks import tune_trial


def config_fields(config: dict) -> dict:
    """A trial's config without the search-only parameters (names with a dot, such as
    `class_score_thresh.0`, that a define-by-run space combines into a field's value)."""
    return {k: v for k, v in config.items() if "." not in k}


def search_trial(config: dict, **trainer_kwargs) -> None:
    tune_trial(config_fields(config), **trainer_kwargs)


def thresholds_trial(config: dict, cache: str) -> None:
    """One trial of a predictions space: post-process the cached validation predictions and score them."""
    params = {k: v for k, v in config_fields(config).items() if k in POSTPROCESS_FIELDS}
    report_trial({**evaluate_thresholds(cached_predictions(cache), params), "epoch": 1})


_CACHES: dict[str, PredictionCache] = {}


def cached_predictions(path: str) -> PredictionCache:
    # Reused trial actors keep the (read-only) predictions between trials.
    if path not in _CACHES:
        _CACHES[path] = load_cache(Path(path))
    return _CACHES[path]
