"""Named search spaces: name -> function returning {config field: ray.tune distribution}.

Keys are config field names (MaskRCNNConfig or ClassifierConfig); each space names the recipe it searches
around by default. Tuple-valued fields are sampled as strings ("24,40,80,128,256")
that the config parses, because Optuna's categorical choices must be scalars.
"""

from collections.abc import Callable

from datasets.errors import UserError

SPACES: dict[str, tuple[Callable[[], dict], str, str]] = {}


def register_space(name: str, description: str, recipe: str = "dsb2018_demo"):
    def deco(fn: Callable[[], dict]) -> Callable[[], dict]:
        SPACES[name] = (fn, description, recipe)
        return fn

    return deco


def get_space(name: str) -> dict:
    if name not in SPACES:
        raise UserError(f"--space: unknown search space '{name}'; valid: {', '.join(sorted(SPACES))}")
    return SPACES[name][0]()


def default_recipe(name: str) -> str:
    get_space(name)  # unknown names fail here, listing the valid ones
    return SPACES[name][2]


from search_spaces import classifier, maskrcnn  # noqa: E402,F401  (registers the spaces)
