"""Named search spaces. Keys are config field names (MaskRCNNConfig or ClassifierConfig); each space names the
recipe it searches around by default.

A space is one of:
- a function returning {config field: ray.tune distribution} (searchable by TPE, random and grid);
- a define-by-run function `fn(trial)` that calls Optuna's `trial.suggest_*` (conditional spaces: which
  parameters exist depends on earlier choices), registered with `define_by_run=True`; it may return a dict
  of values derived from the suggestions. No computation inside: it runs on the driver for every trial.

Tuple-valued fields are sampled as strings ("24,40,80,128,256") that the config parses, because Optuna's
categorical choices must be scalars. A space registered with `on_predictions=True` is searched on cached
predictions of a trained model instead of by training (`thresholds`); its function also takes the model's
category names: `fn(trial, categories)`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from datasets.errors import UserError


@dataclass(frozen=True)
class Space:
    name: str
    fn: Callable
    description: str
    recipe: str
    define_by_run: bool = False
    on_predictions: bool = False


SPACES: dict[str, Space] = {}


def register_space(
    name: str,
    description: str,
    recipe: str = "dsb2018_demo",
    *,
    define_by_run: bool = False,
    on_predictions: bool = False,
):
    def deco(fn: Callable) -> Callable:
        SPACES[name] = Space(name, fn, description, recipe, define_by_run or on_predictions, on_predictions)
        return fn

    return deco


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise UserError(f"--space: unknown search space '{name}'; valid: {', '.join(sorted(SPACES))}")
    return SPACES[name]


def default_recipe(name: str) -> str:
    return get_space(name).recipe


def optuna_space(space: Space, categories: tuple[str, ...] = ("object",)):
    """What Ray's OptunaSearch takes as `space`: the define-by-run function (with the categories bound for a
    predictions space), or the dict of ray.tune distributions."""
    if space.on_predictions:
        return partial(space.fn, categories=categories)  # picklable: Tune saves the searcher with it
    return space.fn if space.define_by_run else space.fn()


def sample(space: Space, seed: int, categories: tuple[str, ...] = ("object",)) -> dict:
    """One sample of `space` as {config field: value}, drawn by Optuna's random sampler as a search would
    (tests build a config from samples of every space)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    fn = optuna_space(space, categories)
    if callable(fn):
        trial = study.ask()
        derived = fn(trial) or {}
        return {**trial.params, **derived}
    return study.ask(fixed_distributions=OptunaSearch.convert_search_space(fn)).params


def distributions(space: Space, params: dict, categories: tuple[str, ...] = ("object",)) -> dict:
    """The Optuna distributions behind one trial's `params` (for rebuilding a study from the trials: plots and
    parameter importances). A define-by-run space is replayed on the trial's values."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    fn = optuna_space(space, categories)
    if callable(fn):
        trial = optuna.trial.FixedTrial(params)
        fn(trial)
        return trial.distributions
    return OptunaSearch.convert_search_space(fn)


from search_spaces import classifier, maskrcnn, thresholds  # noqa: E402,F401  (registers the spaces)
