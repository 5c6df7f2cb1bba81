"""The GPU check (`python -m platform.bench gpu`, `make gpu-check`; issue #22): one command, at most 8
minutes on one H100/H200, no downloads, that measures what a GPU changes (Mask R-CNN and classifier
training throughput by AMP, batch and memory layout; what only a GPU can test; inference; Ray Train's and
Serve's overheads; a 3-minute training scored on unseen images) and writes
bench/results/<date>-<gpu>.json and a Markdown table beside it, then prints the table.

The steps (gpu_steps.STEPS) run most valuable first, each within its time budget; every row a step
measures is written at once (temporary file + rename), so a run cut short keeps what it measured, and a
step that fails records its error while the run goes on. A rerun on the same day (`--only STEP`) replaces
those steps' results in the same files. Without a GPU it says so in one line and exits 0; `--smoke` runs
every step on the CPU with tiny sizes (tests/test_gpu_check.py), `--device cpu` at full size writes the
CPU figures the GPU's are compared with.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets.errors import UserError
from platform.benchmarks.gpu_steps import CPU_REFERENCE, GPU, SMOKE, STEPS, Context, Sizes, Skipped, Step

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
SMOKE_RESULTS = REPO / "bench_out" / "gpu-smoke"  # ignored by git: a smoke run's numbers mean nothing
SHARED_DSB2018 = REPO.parent / "shared" / "data" / "dsb2018" / "stage1_train"
RUN_MINUTES = 8.0
# A step past its budget by this much is stopped (SIGALRM): its own checks of the budget did not stop it.
GRACE_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [step.name for step in STEPS]
    parser.add_argument("--smoke", action="store_true", help="every step with tiny sizes (on the CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cpu for --smoke, else cuda")
    parser.add_argument(
        "--only", action="append", choices=names, default=[], help="run this step (repeatable)"
    )
    parser.add_argument("--skip", action="append", choices=names, default=[], help="leave this step out")
    parser.add_argument(
        "--out", help=f"results folder (default {RESULTS.relative_to(REPO)}; smoke: bench_out/)"
    )
    parser.add_argument("--minutes", type=float, default=RUN_MINUTES, help="the whole run's time")
    parser.add_argument(
        "--dsb2018", default=str(SHARED_DSB2018), help="DSB2018 image folders (the quality step's images)"
    )


@dataclass
class Run:
    """One run's settings: what every step's Context is made from."""

    device: str
    sizes: Sizes
    dsb2018: Path
    results: Path
    started: float
    deadline: float  # time.perf_counter() by which the whole run should be done
    grace_s: float = GRACE_S


def pick_device(args) -> tuple[str | None, str]:
    """(`--device`, else cpu for --smoke, else cuda when torch sees a GPU; or None and why there is nothing
    to measure here)."""
    try:
        import torch
    except ModuleNotFoundError:
        return None, "no GPU check here: torch is not installed"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.device or args.smoke or torch.cuda.is_available():
        return args.device or ("cpu" if args.smoke else "cuda"), ""
    return None, (
        "no GPU here (torch.cuda.is_available() is False): nothing to measure; "
        "`python -m platform.bench gpu --smoke` runs every step on the CPU at tiny sizes"
    )


def device_info(device: str) -> dict:
    """What the numbers were measured on."""
    import torch

    cuda = device == "cuda"
    return {
        "device": device,
        "name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        # the float32 modes the "amp off" rows ran in (torch's defaults unless the environment changed them)
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cpu_cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": round(os.getloadavg()[0], 2),  # at the start: other work on a shared machine
        "python": sys.version.split()[0],
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def results_paths(out: Path, info: dict, smoke: bool) -> tuple[Path, Path]:
    """bench/results/<date>-<device name>.json and .md (smoke- before the name of a smoke run's)."""
    slug = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    stem = f"{time.strftime('%Y-%m-%d')}-{'smoke-' if smoke else ''}{slug}"
    return out / f"{stem}.json", out / f"{stem}.md"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or a run cut
    short) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's file is the owner's only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def missing_module(names: tuple[str, ...]) -> str | None:
    """The first of `names` that cannot be imported here, without importing any of them."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


class StepTimeout(Exception):
    """A step ran past its budget and the grace time."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StepTimeout in this (main) thread after `seconds`; a subprocess.run in flight is killed."""

    def expire(signum, frame):
        raise StepTimeout(f"stopped after {seconds:.0f} s, its budget and the grace time")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _torch_threads() -> Callable[[], None]:
    """A function that puts torch's thread count back (steps such as `bench serve`'s change it)."""
    if "torch" not in sys.modules:
        return lambda: None
    import torch

    threads = torch.get_num_threads()
    return lambda: torch.set_num_threads(threads)


def run_step(step: Step, run: Run, save: Callable[[dict], None]) -> dict:
    """Run one step within its budget (and what is left of the run's); its results entry: status measured,
    skipped (with the reason) or error (with the error), its rows and notes, seconds and budget."""
    budget = min(step.budget_s * run.sizes.budget_factor, run.deadline - time.perf_counter())
    entry = {"title": step.title, "status": "running", "budget_s": round(budget, 1), "rows": [], "notes": []}
    started = time.perf_counter()
    print(
        f"[{started - run.started:6.1f} s] --- {step.name}: {step.title} (budget {budget:.0f} s)", flush=True
    )
    missing = missing_module(step.needs)
    if missing or budget <= 0:
        reason = f"{missing} not installed" if missing else "no time left of the run"
        return _finish(entry, started, save, "skipped", reason=reason)
    restore_threads = _torch_threads()
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{step.name}-") as work:
        ctx = Context(
            run.device,
            run.sizes,
            started + budget,
            run.started,
            run.dsb2018,
            run.results,
            Path(work),
            save=lambda: save(entry),
            rows=entry["rows"],
            notes=entry["notes"],
        )
        try:
            with time_limit(budget + run.grace_s):
                step.run(ctx)
        except Skipped as e:
            return _finish(entry, started, save, "skipped", reason=str(e))
        except ModuleNotFoundError as e:
            return _finish(entry, started, save, "skipped", reason=f"{e.name} not installed")
        except Exception as e:  # the run goes on; the error and where it happened are in the results
            tail = traceback.format_exc().strip().splitlines()[-12:]
            e = _timeout_within(e) or e
            return _finish(entry, started, save, "error", error=f"{type(e).__name__}: {e}", traceback=tail)
        finally:
            restore_threads()
    return _finish(entry, started, save, "measured")


def _timeout_within(error: BaseException | None) -> StepTimeout | None:
    """The StepTimeout behind `error`: raised inside a C extension's call, it comes back as that call's own
    error (Python's SystemError "returned a result with an exception set", with it as the context)."""
    while error is not None and not isinstance(error, StepTimeout):
        error = error.__cause__ or error.__context__
    return error


def _finish(entry: dict, started: float, save: Callable[[dict], None], status: str, **more) -> dict:
    entry.update(status=status, seconds=round(time.perf_counter() - started, 1), **more)
    entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save(entry)
    print(f"    {status}" + (f": {more.get('reason') or more.get('error')}" if more else ""), flush=True)
    return entry


def run_steps(steps: tuple[Step, ...], run: Run, doc: dict, write: Callable[[dict], None]) -> dict:
    """Each step in order into doc["steps"] (a rerun replaces the step's earlier entry), `write(doc)`
    after every row and at the end of every step."""

    for step in steps:

        def save(entry: dict, name: str = step.name) -> None:
            doc["steps"][name] = entry
            write(doc)

        run_step(step, run, save)
    return doc


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    """A Markdown table of `rows`: a column per key, in the order keys first appear."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]


def _status(entry: dict) -> str:
    detail = entry.get("reason") or entry.get("error")
    return f"{entry['status']}: {detail}" if detail else entry["status"]


def markdown(doc: dict) -> str:
    """The results as Markdown: the device, a line per step (status, seconds of its budget), then each
    step's table and notes."""
    info = doc["device"]
    known = [s.name for s in STEPS]
    order = [n for n in known if n in doc["steps"]] + [n for n in doc["steps"] if n not in known]
    lines = [
        f"# GPU check: {info['name']}{' (smoke run)' if doc['smoke'] else ''}, {doc['date']}",
        "",
        f"`{doc['command']}`; torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, "
        f"TF32 matmul {info['tf32_matmul']} / cuDNN {info['tf32_cudnn']}, {info['cpu_cores']} CPU cores "
        f"({info['cpu_model']}; load average {info.get('load_average')} at the start), "
        f"Python {info['python']}",
        "",
        *table(
            [
                dict(
                    step=n,
                    status=_status(doc["steps"][n]),
                    seconds=doc["steps"][n].get("seconds"),
                    budget_s=doc["steps"][n]["budget_s"],
                )
                for n in order
            ]
        ),
    ]
    for name in order:
        entry = doc["steps"][name]
        lines += ["", f"## {name}: {entry['title']}", "", f"{_status(entry)}"]
        if entry["rows"]:
            lines += ["", *table(entry["rows"])]
        if entry["notes"]:
            lines += ["", *(f"- {note}" for note in entry["notes"])]
    return "\n".join(lines) + "\n"


def selected(only: list[str], skip: list[str]) -> tuple[Step, ...]:
    return tuple(s for s in STEPS if (not only or s.name in only) and s.name not in skip)


def run_check(args) -> int:
    """`python -m platform.bench gpu`: the check on this machine's GPU (or --smoke / --device cpu)."""
    device, why_not = pick_device(args)
    if device is None:
        print(why_not)
        return 0
    sizes = SMOKE if args.smoke else (GPU if device == "cuda" else CPU_REFERENCE)
    if args.smoke:
        import torch

        # its tiny tensors gain nothing from threads, and on a shared machine threads that wait for a core
        # held by another process slowed a smoke run 4x (106 s -> 25 s on 2 cores under a load of 3)
        torch.set_num_threads(1)
    out = Path(args.out) if args.out else (SMOKE_RESULTS if args.smoke else RESULTS)
    info = device_info(device)
    json_path, md_path = results_paths(out.resolve(), info, args.smoke)
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"steps": {}}
    command = "python -m platform.bench gpu " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["gpu"] else [])
    doc.update(device=info, smoke=args.smoke, date=time.strftime("%Y-%m-%d"), command=command.strip())

    def write(doc: dict) -> None:
        write_atomic(json_path, json.dumps(doc, indent=1) + "\n")
        write_atomic(md_path, markdown(doc))

    started = time.perf_counter()
    deadline = started + 60 * args.minutes * sizes.budget_factor
    run = Run(device, sizes, Path(args.dsb2018), out.resolve(), started, deadline)
    print(f"GPU check on {info['name']}: results in {json_path} and {md_path.name}", flush=True)
    run_steps(selected(args.only, args.skip), run, doc, write)
    print("\n" + markdown(doc))
    print(f"results: {json_path}\n         {md_path}")
    return 0
