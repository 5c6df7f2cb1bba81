"""What a search is asked to do (SearchSettings, checked before Ray starts), the searched part of a space
(less the keys fixed on the command line; a grid of it), and what a finished search returns
(SearchSummary)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from datasets.errors import UserError
from search_spaces import Space

SEARCHERS = ("tpe", "random", "grid")
SCHEDULERS = ("asha", "fifo")
MAX_GRID = 1000  # trials; a bigger grid is a mistake on any machine this runs on


@dataclass
class SearchSettings:
    space_name: str
    num_samples: int
    metrics: tuple[str, ...]  # the first is optimised (and ranks the table); more = multi-objective
    modes: tuple[str, ...]  # max or min, one per metric
    experiment: str
    model_name: str
    tracking_uri: str
    storage_path: str
    searcher: str = "tpe"
    scheduler: str = "asha"
    grace_period: int | None = None  # ASHA: epochs before a stop; None: a quarter of them, at least 2
    reduction_factor: float = 2
    grid_points: int = 3  # values per numeric parameter of a grid search
    workers_per_trial: int = 1
    gpus_per_trial: float = 0
    cpus_per_worker: float | None = None
    concurrent_trials: int = 1
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # key=value from the command line: fixed, not searched
    model: str = ""  # predictions spaces: the trained model whose validation predictions are searched
    model_folder: str = ""  # its local checkpoint folder (resolved by the caller, before the search starts)
    recipe_out: str = ""  # where the best config goes as a recipe file ("" = best_recipes/<search>.yaml)
    address: str | None = None
    repo: str | None = None  # shipped to workers as working_dir when running on a cluster
    name: str = field(default="")  # the search's name: Tune experiment folder and MLflow tag

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def fixed(self) -> tuple[str, ...]:
        return tuple(self.overrides)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass
class SearchSummary:
    """A finished search: its tables, and what registering its best model needs. The caller registers it
    (the champion rule lives in deploy/, a layer above trainers/)."""

    table: str
    rows: list[dict]
    best_trial: str
    best_value: float  # the best trial's settings.metric
    best_config: Any  # its whole config (a MaskRCNNConfig or a ClassifierConfig)
    best_run_id: str  # its nested MLflow run: the registered model is logged there
    # Its last checkpoint in the storage path; "" for a predictions space, whose model is the searched one
    # (settings.model_folder) with the best post-processing thresholds (driver.best_checkpoint).
    best_checkpoint: str
    # Predictions space: (the searched model, its metric with its own thresholds on the same cached
    # predictions), the number to beat when that model is the champion; None otherwise.
    baseline: tuple[str, float] | None
    parent_run_id: str
    recipe_path: Path
    settings: SearchSettings
    pareto: str = ""  # multi-objective: the Pareto front as a table
    # A detector search: the classical baseline (config field `baseline`) on the search's validation
    # images, (method, its metrics), shown as a row of the table; never a candidate. None otherwise.
    classical: tuple[str, dict] | None = None


def check_settings(settings: SearchSettings, space: Space) -> None:
    """Every user mistake in the search flags, before Ray starts."""
    if settings.searcher not in SEARCHERS:
        raise UserError(f"--searcher: unknown '{settings.searcher}'; valid: {', '.join(SEARCHERS)}")
    if settings.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: unknown '{settings.scheduler}'; valid: {', '.join(SCHEDULERS)}")
    if len(settings.modes) != len(settings.metrics):
        raise UserError(
            f"--mode: give one mode per --metric ({len(settings.metrics)} metrics, "
            f"{len(settings.modes)} modes)"
        )
    for mode in settings.modes:
        if mode not in ("max", "min"):
            raise UserError(f"--mode: expected max or min, got '{mode}'")
    if settings.searcher == "grid" and space.define_by_run:
        raise UserError(
            f"--searcher grid: space {space.name} is conditional (define-by-run) and has no fixed grid; "
            "use --searcher tpe or random"
        )
    if settings.searcher == "grid" and settings.multi_objective:
        raise UserError("--searcher grid: a multi-objective search needs --searcher tpe or random")
    if settings.grid_points < 2:
        raise UserError(f"--grid-points: expected 2 or more, got {settings.grid_points}")
    if (settings.grace_period is not None and settings.grace_period < 1) or settings.reduction_factor <= 1:
        raise UserError("--grace-period: expected >= 1 epoch; --reduction-factor: expected > 1")
    if settings.searcher == "grid":
        size = grid_size(grid(searched(space, settings), settings.grid_points))
        if size > MAX_GRID:
            raise UserError(
                f"--searcher grid: space {space.name} makes {size} trials (> {MAX_GRID}); "
                "fix some of its keys with key=value or lower --grid-points"
            )


def searched(space: Space, settings: SearchSettings) -> dict | None:
    """A dict space less the keys fixed on the command line; None for a define-by-run space."""
    if space.define_by_run:
        return None
    return {k: v for k, v in space.fn().items() if k not in settings.fixed}


def grid(space: dict, points: int) -> dict:
    """Ray Tune grid_search over a dict space: every choice of a categorical, `points` values spanning a
    numeric range (geometrically for log-uniform ones, rounded and de-duplicated for integers)."""
    out = {}
    for key, domain in space.items():
        if isinstance(domain, Categorical):
            values = list(domain.categories)
        elif isinstance(domain, Float | Integer):
            log = isinstance(domain.get_sampler(), LogUniform)
            upper = domain.upper - (1 if isinstance(domain, Integer) else 0)  # randint's upper is exclusive
            span = np.geomspace if log else np.linspace
            values = span(domain.lower, upper, points).tolist()
            if isinstance(domain, Integer):
                values = sorted({round(v) for v in values})
        else:
            raise UserError(f"--searcher grid: cannot make a grid of {key} ({type(domain).__name__})")
        out[key] = tune.grid_search(values)
    return out


def grid_size(space: dict) -> int:
    size = 1
    for value in space.values():
        if isinstance(value, dict) and "grid_search" in value:
            size *= len(value["grid_search"])
    return size
