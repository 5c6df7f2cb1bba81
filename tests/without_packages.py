"""Run a module as `python -m` would, with some installed packages made unimportable: what a machine
without them sees. tests/test_gpu_check.py runs the GPU check so, as the bare GPU machine would
(bench/README.md: no Ray, MLflow or FastAPI there).

python -m tests.without_packages ray,mlflow platform.bench gpu --smoke
"""

import importlib.abc
import runpy
import sys


class Hidden(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: importing (or finding the spec of) a hidden package or any of its modules
    raises ModuleNotFoundError, as it would where the package is not installed."""

    def __init__(self, names: list[str]):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"No module named '{fullname}' (hidden by tests.without_packages)", name=fullname
            )
        return None


def main() -> None:
    names, module, *args = sys.argv[1:]
    sys.meta_path.insert(0, Hidden(names.split(",")))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
