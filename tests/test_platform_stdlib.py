"""`platform` (this package) must be the standard library's `platform` for everyone else in the process."""

import json
import subprocess
import sys

import platform
from tests.helpers import REPO

PROBE = """
import json, platform
print(json.dumps({
    "system": platform.system(), "machine": platform.machine(), "uname": list(platform.uname()),
    "python_version": platform.python_version(), "python_implementation": platform.python_implementation(),
    "libc_ver": list(platform.libc_ver()), "node": platform.node(), "release": platform.release(),
    "version": platform.version(), "platform": platform.platform(), "processor": platform.processor(),
    "architecture": list(platform.architecture()), "python_compiler": platform.python_compiler(),
    "freedesktop_os_release": platform.freedesktop_os_release().get("ID"),
    "file": platform.__file__,
}))
"""


def _probe(cwd, isolated: bool) -> dict:
    cmd = [sys.executable, *(["-I"] if isolated else []), "-c", PROBE]
    return json.loads(subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout)


def test_this_process_uses_our_package():
    assert platform.__file__.startswith(str(REPO / "platform"))


def test_every_function_matches_the_stdlib(tmp_path):
    ours = _probe(REPO, isolated=False)
    stdlib = _probe(tmp_path, isolated=True)
    assert ours.pop("file") == str(REPO / "platform" / "__init__.py")
    assert not stdlib.pop("file").startswith(str(REPO))
    assert ours == stdlib


def test_public_names_match_the_stdlib(tmp_path):
    code = (
        "import json, platform; print(json.dumps(sorted(n for n in dir(platform) if not n.startswith('__'))))"
    )
    stdlib_names = json.loads(
        subprocess.run(
            [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout
    )
    assert set(stdlib_names) <= set(dir(platform))


def test_torch_ray_mlflow_work_with_it(tmp_path):
    code = f"""
import platform
assert platform.__file__.startswith({str(REPO)!r})
import torch, ray, mlflow
assert torch.ones(3).sum().item() == 3
mlflow.set_tracking_uri("sqlite:///{tmp_path}/m.db")
experiment = mlflow.create_experiment("parity", artifact_location="{tmp_path.as_uri()}/artifacts")
with mlflow.start_run(experiment_id=experiment) as run:
    mlflow.log_param("system", platform.system())
assert mlflow.get_run(run.info.run_id).data.params["system"] == platform.system()
ray.init(num_cpus=1, include_dashboard=False)
remote = ray.get(ray.remote(lambda: __import__("platform").system()).remote())
assert remote == platform.system(), remote
ray.shutdown()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
