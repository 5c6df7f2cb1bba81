"""The platform's command-line entry points, and the standard library's `platform` module.

Run from the repository root, `python -m platform.tune` makes this package *the* `platform` module for
the whole process, so torch, ray, mlflow and pytest, which call `platform.system()` and friends, would
otherwise find nothing. We therefore load the standard library's `platform.py` by path and re-export its
whole namespace. Everything a Ray worker runs lives outside this package (workers import the stdlib
`platform` before any user code; see ../shared/docs/DESIGN.md).
"""

import importlib.util as _importlib_util
import sysconfig as _sysconfig
from pathlib import Path as _Path

_STDLIB_PATH = _Path(_sysconfig.get_paths()["stdlib"]) / "platform.py"
# Loaded under the name "platform" so that its classes (uname_result) pickle as `platform.X`, which both
# this process and a Ray worker (stdlib platform) can resolve.
_spec = _importlib_util.spec_from_file_location("platform", _STDLIB_PATH)
_stdlib = _importlib_util.module_from_spec(_spec)
_spec.loader.exec_module(_stdlib)

_OWN = {
    "__name__",
    "__file__",
    "__spec__",
    "__loader__",
    "__package__",
    "__path__",
    "__cached__",
    "__builtins__",
}
globals().update({k: v for k, v in vars(_stdlib).items() if k not in _OWN})
