"""The cluster definitions in deploy/cluster/ are valid for the tools that read them and cannot drift from
the project: the launcher YAML against Ray's own schema, the KubeRay manifests' required fields, GPU
limits, and pip pins and Ray images equal to pyproject.toml's pins. Nothing here starts Ray."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from platform import launch
from tests.helpers import REPO
from trainers.ray_seam import WORKING_DIR_EXCLUDES

CLUSTER = REPO / "deploy" / "cluster"
PINS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
RAY_VERSION = next(re.sub(r"^ray(\[.*\])?==", "", p) for p in PINS if p.startswith("ray"))
PYTHON_TAG = "py311"  # requires-python = ">=3.11,<3.12"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check_image(image: str, gpu: bool) -> None:
    """Ray's image of the pinned Ray and the project's Python (a GPU image for GPU nodes)."""
    name, tag = image.split(":")
    assert name == "rayproject/ray", image
    assert tag == f"{RAY_VERSION}-{PYTHON_TAG}" + ("-gpu" if gpu else ""), image


# ---- Ray cluster launcher (AWS) ---------------------------------------------------------------------------


def test_launcher_config_is_valid_for_ray():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # as written
    validate_config(prepare_config(config))  # as `ray up` sees it, merged with Ray's AWS defaults


def test_launcher_gpu_nodes_and_project_runtime():
    config = load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials never run on the head"
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in gpu_types)
    assert all(t["max_workers"] >= 1 and t["min_workers"] == 0 for t in gpu_types)
    check_image(config["docker"]["image"], gpu=True)
    check_image(config["docker"]["head_image"], gpu=False)
    assert config["file_mounts"]["~/foram-platform"] == ".", "the checkout goes to every node"
    assert set(WORKING_DIR_EXCLUDES) <= set(config["rsync_exclude"])


def test_launcher_nodes_require_the_ray_token():
    """Every container runs Ray in token mode and gets the token file Ray reads by default (the one
    `ray get-auth-token --generate` writes and platform.launch sends); the dashboard stays on localhost."""
    config = load("aws-gpu.yaml")
    assert "--env RAY_AUTH_MODE=token" in [o.split(" #")[0].strip() for o in config["docker"]["run_options"]]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in command and "dashboard-host" not in command


def test_launcher_installs_exactly_the_pinned_dependencies(tmp_path):
    """The setup command's requirements file, produced here from this checkout's pyproject.toml as a node
    does it from its copy, is pyproject.toml's dependency list (ray included: the image's, same version)."""
    config = load("aws-gpu.yaml")
    remote = next(iter(config["file_mounts"]))
    assert remote.startswith("~/")
    (tmp_path / remote[2:]).mkdir(parents=True)
    (tmp_path / remote[2:] / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    command = config["setup_commands"][0]
    write_requirements, install = command.split(" && ")
    assert install.startswith("pip install") and "-r ~/foram-platform/requirements.txt" in install
    out = subprocess.run(
        ["bash", "-c", write_requirements.replace("python ", f"{sys.executable} ", 1)],
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / remote[2:] / "requirements.txt").read_text().split() == PINS


# ---- KubeRay ----------------------------------------------------------------------------------------------


SHARED_RESULTS = "/results"  # where the manifests mount the shared --storage-path volume


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}, "Ray token authentication on (KubeRay >= 1.5.1)"
    assert tuple(int(v) for v in RAY_VERSION.split(".")) >= (2, 52), "token authentication needs Ray 2.52"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "trials never run on the head"
    (head_container,) = head["template"]["spec"]["containers"]
    check_image(head_container["image"], gpu=False)
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        check_image(container["image"], gpu=True)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts, "DataLoader workers need more than Docker's 64 MB /dev/shm"
    for pod in (head, *groups):  # --storage-path: one ReadWriteMany volume, mounted alike on every pod
        (container,) = pod["template"]["spec"]["containers"]
        assert {"name": "results", "mountPath": SHARED_RESULTS} in container["volumeMounts"]
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["template"]["spec"]["volumes"]}
        assert claims["results"] == {"claimName": "foram-results"}


def test_rayjob_manifest():
    job = load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    check_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "platform.tune"]
    from platform.tune import build_parser

    args = build_parser().parse_args(argv[3:])  # flags the command really has
    assert args.space and args.gpus_per_trial >= 1 and args.storage_path.startswith(SHARED_RESULTS + "/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"]["packages"] == launch.pinned_requirements()
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert spec["shutdownAfterJobFinishes"] is True


def test_raycluster_manifest():
    cluster = load("kuberay-raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_cluster_spec(cluster["spec"])


def test_pinned_requirements_are_pyprojects_without_ray():
    pins = launch.pinned_requirements()
    assert pins == [p for p in PINS if not p.startswith("ray")]
    assert all("==" in p for p in pins) and "torch==2.15.0" in pins


def test_network_policy_lets_only_ray_pods_reach_ray_ports():
    """Ray pods accept every port from Ray pods only; anyone else the policy admits (the operator, the
    RayJob's submitter, labelled clients) reaches the dashboard port alone, never the GCS or client port."""
    (policy,) = yaml.safe_load_all((CLUSTER / "kuberay-networkpolicy.yaml").read_text())
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    ray_pods = {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert spec["podSelector"] == ray_pods and spec["policyTypes"] == ["Ingress"]
    job_name = load("kuberay-rayjob.yaml")["metadata"]["name"]
    peers = []
    for rule in spec["ingress"]:
        assert rule["from"], "an empty `from` admits everyone"
        if rule["from"] == [{"podSelector": ray_pods}]:
            continue
        assert [p["port"] for p in rule["ports"]] == [8265] and rule["ports"][0]["protocol"] == "TCP"
        peers += rule["from"]
    labels = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
    assert {"batch.kubernetes.io/job-name": job_name} in labels, "the RayJob's submitter reaches its cluster"
    assert any("namespaceSelector" in p and "podSelector" not in p for p in peers), "the KubeRay operator"
