"""The GPU check (`python -m platform.bench gpu`, `make gpu-check`) where there is no GPU: it says so in one
line and exits 0; its --smoke run measures or skips (saying why) every step on the CPU and writes the
results JSON and Markdown, with the packages the bare GPU machine lacks hidden, so that the check cannot rot
before a GPU shows up. And the runner's rules: a failing step is recorded and the run goes on, a step past
its time limit is stopped, a batch size that runs out of memory ends the larger ones, a rerun replaces a
step's results."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from platform.benchmarks.gpu import Run, markdown, run_steps, write_atomic
from platform.benchmarks.gpu_steps import SMOKE, STEPS, Context, Skipped, Step, cpu_figures, sweep
from tests.helpers import REPO, run_cli

# Not on the GPU machine (bench/README.md): the smoke run hides them, as that machine lacks them.
HIDDEN = ("ray", "mlflow", "optuna", "fastapi", "starlette", "multipart", "uvicorn")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    started = time.perf_counter()
    args = ("platform.bench", "gpu", "--smoke", "--device", "cpu", "--out", str(out))
    done = run_cli("tests.without_packages", ",".join(HIDDEN), *args, timeout=900)
    return done, out, time.perf_counter() - started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    done = run_cli("platform.bench", "gpu", timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and done.stdout.startswith("no GPU"), done.stdout


def test_the_smoke_run_measures_or_skips_every_step(smoke_run):
    done, out, seconds = smoke_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [json_path], [md_path] = out.glob("*-smoke-cpu.json"), out.glob("*-smoke-cpu.md")
    doc = json.loads(json_path.read_text())
    assert list(doc["steps"]) == [step.name for step in STEPS]
    for name, entry in doc["steps"].items():
        assert entry["status"] in ("measured", "skipped"), (name, entry.get("error"), entry.get("traceback"))
        assert entry["status"] == "measured" or entry["reason"], name
        assert not [row for row in entry["rows"] if str(row.get("status", "")).startswith("error")], name
    steps = doc["steps"]
    # the packages the GPU machine lacks skip exactly the steps that need them
    assert (steps["ray_train"]["reason"], steps["serve"]["reason"]) == (
        "ray not installed",
        "ray not installed",
    )
    for name in ("maskrcnn", "classifier", "gpu_tests", "inference"):
        assert steps[name]["status"] == "measured", name
    assert any(row.get("images_per_s", 0) > 0 for row in steps["maskrcnn"]["rows"])
    assert {row["outcome"] for row in steps["gpu_tests"]["rows"]} == {"skipped"}  # no CUDA here
    if steps["quality"]["status"] == "skipped":  # only where ../shared/data has no DSB2018 images
        assert "not there" in steps["quality"]["reason"]
    text = md_path.read_text()
    assert text == markdown(doc) and all(f"## {name}: " in text for name in doc["steps"])
    assert text.strip() in done.stdout  # and printed
    assert not list(out.glob(".*.tmp")), "a temporary file of the atomic writes was left"
    print(f"smoke run: {seconds:.0f} s")


def fake_run(tmp_path: Path, grace_s: float = 30.0) -> Run:
    now = time.perf_counter()
    return Run("cpu", SMOKE, tmp_path, tmp_path, now, now + 60, grace_s=grace_s)


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    def fails(ctx):
        ctx.add(measure="before the failure", value=1.0)
        raise ValueError("broken")

    def cannot(ctx):
        raise Skipped("nothing to measure here")

    def sleeps(ctx):
        time.sleep(10)

    steps = (
        Step("fails", "a failing step", 5, fails),
        Step("needs", "a missing package", 5, fails, needs=("no_such_package_here",)),
        Step("cannot", "a skipping step", 5, cannot),
        Step("sleeps", "a step past its limit", 0.2, sleeps),
        Step("works", "a working step", 5, lambda ctx: ctx.add(measure="m", value=2.0)),
    )
    written = []
    path = tmp_path / "results.json"

    def write(doc):
        write_atomic(path, json.dumps(doc))
        written.append(json.loads(path.read_text()))

    started = time.perf_counter()
    doc = run_steps(steps, fake_run(tmp_path, grace_s=0.3), {"steps": {}}, write)
    assert time.perf_counter() - started < 5  # the sleeping step was stopped
    steps = doc["steps"]
    assert steps["fails"]["status"] == "error" and steps["fails"]["error"] == "ValueError: broken"
    assert steps["fails"]["rows"] == [{"measure": "before the failure", "value": 1.0}]  # kept
    assert (steps["needs"]["status"], steps["needs"]["reason"]) == (
        "skipped",
        "no_such_package_here not installed",
    )
    assert (steps["cannot"]["status"], steps["cannot"]["reason"]) == ("skipped", "nothing to measure here")
    assert steps["sleeps"]["status"] == "error" and "StepTimeout" in steps["sleeps"]["error"]
    assert steps["works"]["status"] == "measured" and steps["works"]["rows"] == [
        {"measure": "m", "value": 2.0}
    ]
    # a row is written as it comes: the failing step's row was on disk before it failed
    assert any(
        d["steps"].get("fails", {}).get("status") == "running" and d["steps"]["fails"]["rows"]
        for d in written
    )
    assert list(tmp_path.iterdir()) == [path]


def test_a_rerun_replaces_only_its_steps(tmp_path):
    doc = {"steps": {}}
    first = (Step("a", "A", 5, lambda ctx: ctx.add(run=1)), Step("b", "B", 5, lambda ctx: ctx.add(run=1)))
    run_steps(first, fake_run(tmp_path), doc, lambda doc: None)
    run_steps((Step("a", "A", 5, lambda ctx: ctx.add(run=2)),), fake_run(tmp_path), doc, lambda doc: None)
    assert [doc["steps"][name]["rows"] for name in ("a", "b")] == [[{"run": 2}], [{"run": 1}]]


def demo_config():
    from trainers.recipes import get_recipe

    return get_recipe("dsb2018_demo")


def test_out_of_memory_ends_the_larger_batches_and_the_budget_the_rest(tmp_path):
    def measure(cfg, warm, timed, device, channels_last):
        if cfg.batch_size >= 4 and not channels_last:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"images_per_s": 10.0 * cfg.batch_size, "peak_gib": 1.0}

    sizes = replace(SMOKE, batches=(2, 4, 8), amps=("off",))
    ctx = Context("cuda", sizes, time.perf_counter() + 60, time.perf_counter(), tmp_path, tmp_path, tmp_path)
    pool = [(torch.zeros(3, 8, 8), {}) for _ in range(4)]
    for channels_last in (False, True):
        sweep(ctx, "fake", demo_config(), pool, channels_last, measure)
    rows = [(r["channels_last"], r["batch"], r["status"]) for r in ctx.rows]
    assert rows == [
        (False, 2, "measured"),
        (False, 4, "out of memory"),
        (False, 8, "not run: out of memory at batch 4"),
        (True, 2, "measured"),
        (True, 4, "measured"),
        (True, 8, "measured"),
    ]
    assert ctx.rows[0]["s_per_iter"] == pytest.approx(0.1)
    spent = Context("cuda", sizes, time.perf_counter() - 1, time.perf_counter(), tmp_path, tmp_path, tmp_path)
    sweep(spent, "fake", demo_config(), pool, False, measure)
    assert {r["status"] for r in spent.rows} == {"not run: step budget spent"}


def test_the_gpu_run_reads_the_latest_cpu_figures(tmp_path):
    def entry(value):
        rows = [{"measure": "s/MP tiled", "value": value}, {"measure": "note", "value": "text"}]
        return {"steps": {"inference": {"status": "measured", "rows": rows}}}

    (tmp_path / "2026-01-01-cpu.json").write_text(json.dumps(entry(10.0)))
    (tmp_path / "2026-02-01-cpu.json").write_text(json.dumps(entry(12.0)))
    (tmp_path / "2026-03-01-nvidia-h200.json").write_text(json.dumps(entry(0.5)))
    assert cpu_figures(tmp_path) == {"s/MP tiled": 12.0}
    assert cpu_figures(REPO / "no-such-folder") == {}


@pytest.mark.slow
def test_the_smoke_run_of_the_ray_steps(tmp_path):
    """The two steps the GPU machine skips (no Ray there), with Ray: a local Ray, then Serve (~2 min)."""
    args = (
        "gpu",
        "--smoke",
        "--device",
        "cpu",
        "--only",
        "ray_train",
        "--only",
        "serve",
        "--out",
        str(tmp_path),
    )
    done = run_cli("platform.bench", *args, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("*-smoke-cpu.json")).read_text())
    for name in ("ray_train", "serve"):
        entry = doc["steps"][name]
        assert entry["status"] == "measured", (name, entry.get("error"), entry.get("traceback"))
    assert [row["side"] for row in doc["steps"]["ray_train"]["rows"]] == [
        "plain process",
        "Ray Train, 1 worker",
    ]
    assert any(row["test"] == "batching_on classify" for row in doc["steps"]["serve"]["rows"])


def test_the_device_script_writes_its_results_into_OUT_as_they_come(tmp_path):
    """On the lent GPU machine only $OUT comes back, also from a call its time limit kills: the script must
    write the results there itself, beside the CPU figures they are compared with. It runs here from a copy
    of the checkout that has no .whl/ (nothing is installed) and no .gpu-data/."""
    checkout = tmp_path / "checkout"
    (checkout / "bench" / "results").mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in ("bench", ".whl", ".gpu-data", ".git"):
            (checkout / entry.name).symlink_to(entry)
    shutil.copy(REPO / "bench" / "gpu-device.sh", checkout / "bench")
    [*_, cpu] = sorted((REPO / "bench" / "results").glob("*-cpu.json"))
    shutil.copy(cpu, checkout / "bench" / "results")
    out = tmp_path / "OUT"
    out.mkdir()
    python = Path(sys.executable).parent  # `python3` there is this interpreter
    env = {**os.environ, "OUT": str(out), "PATH": f"{python}{os.pathsep}{os.environ['PATH']}"}
    args = ("bash", "bench/gpu-device.sh", "run", "--smoke", "--only", "classifier", "--minutes", "2")
    done = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no .whl/" in done.stderr
    [json_path] = out.glob("*-smoke-cpu.json")
    assert json.loads(json_path.read_text())["steps"]["classifier"]["status"] == "measured"
    assert (out / cpu.name).exists() and json_path.with_suffix(".md").exists()
    assert "GPU check on cpu" in (out / "gpu-check.log").read_text()
