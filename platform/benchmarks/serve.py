"""Benchmark of the Serve application (`python -m platform.bench serve`): load over loopback HTTP side by
side with the same deployment code called in-process; the classifier with and without dynamic batching;
a tiled mosaic through the endpoint with the detector replica's peak memory.

Models: the registered ones given, else random-init models of the CPU recipes (dsb2018_demo detector,
adrenal3d_cpu classifier) registered in a temporary store. Weights do not change the work per request
much: an untrained Mask R-CNN fills its 100 detection slots, about what a dense nuclei image gives.
"""

import asyncio
import json
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import ray
import requests
import torch
from ray import serve
from ray.util.state import list_actors

from datasets.records import load_image
from deploy.app import application
from deploy.classifier import ClassifierDeployment
from deploy.detector import DetectorDeployment
from deploy.library import png
from deploy.registry import log_checkpoint, register
from deploy.reloading import grouped, use_registry
from deploy.settings import ServeSettings
from platform.benchmarks.tiled import SAMPLE_IMAGES, sample_mosaic
from platform.serve import APP_NAME, HTTP_DEFAULTS, free_port, start_app
from trainers.classification.model import build_classifier, save_classifier
from trainers.config import apply_overrides
from trainers.detection.model import build_model
from trainers.detection.train import save_checkpoint
from trainers.ray_seam import init_ray
from trainers.recipes import get_recipe

REPO = Path(__file__).resolve().parents[2]
HEADER = f"{'':44s} {'reqs':>6s} {'errors':>6s} {'req/s':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s}"


@dataclass
class Inputs:
    """What the clients send: a 256-px sample image, a 224-px slice of it, a 64^3 NIfTI volume."""

    image: np.ndarray
    image_body: bytes
    slice_pixels: np.ndarray
    slice_body: bytes
    volume_body: bytes


def sample_inputs() -> Inputs:
    image_path = sorted(SAMPLE_IMAGES.glob("*/images/*.png"))[0]
    image = load_image(image_path)
    slice_pixels = np.repeat(image[:224, :224, :1], 3, axis=2)
    volume = sorted((SAMPLE_IMAGES.parent / "adrenal3d" / "volumes").glob("*.nii.gz"))[0]
    return Inputs(
        image, image_path.read_bytes(), slice_pixels, png(slice_pixels[..., 0]), volume.read_bytes()
    )


def random_models(root: Path) -> tuple[str, str, str]:
    """(tracking URI, detector URI, classifier URI) of untrained models registered under root."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    use_registry(uri)
    experiment = mlflow.create_experiment("bench-serve", artifact_location=(root / "artifacts").as_uri())
    torch.manual_seed(0)
    detector, classifier = root / "detector", root / "classifier"
    detector.mkdir()
    classifier.mkdir()
    cfg = get_recipe("dsb2018_demo")
    save_checkpoint(detector, cfg, build_model(cfg, 1), [{"id": 1, "name": "nucleus"}], {})
    # 224 px (the GPU recipes' input size): the model, not the HTTP path, is then the work per slice
    ccfg = apply_overrides(get_recipe("adrenal3d_cpu"), {"input_size": 224})
    classes = ["a", "b", "c"]
    save_classifier(classifier, ccfg, build_classifier(ccfg, len(classes)).state_dict(), classes)
    for name, folder in (("bench-detector", detector), ("bench-classifier", classifier)):
        with mlflow.start_run(experiment_id=experiment):
            register(log_checkpoint(folder).model_uri, name)
    return uri, "models:/bench-detector@champion", "models:/bench-classifier@champion"


def _percentiles(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} if len(ms) else {}


RAW = {"Content-Type": "application/octet-stream"}  # the server refuses unlabelled uploads (415)


def load_test(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads posting `body` back to back for `seconds`: requests/s, latency quantiles, errors."""
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client():
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = session.post(url, data=body, headers=RAW, timeout=600)
                    ok = response.status_code == 200
                    response.json()
                except (requests.RequestException, ValueError) as e:
                    ok, response = False, e
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - start if ok else str(response))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / wall,
        **_percentiles(latencies),
    }


def in_process(deployment, settings: ServeSettings, call, seconds: float) -> dict:
    """The deployment's own class, constructed in this process, called back to back for `seconds`: what a
    request costs without HTTP, the proxy, the ingress, the handle and the batching queue (@serve.batch
    only runs inside a replica; the class's `run` is the model call the batch would make)."""
    cls = deployment.func_or_class
    instance = cls(settings)

    async def unbatched(item):
        return (await asyncio.to_thread(grouped, [item], cls.run))[0]

    instance.infer = unbatched

    async def calls():
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or not latencies:
            start = time.perf_counter()
            json.dumps(await call(instance))  # the answer is encoded as the ingress encodes it
            latencies.append(time.perf_counter() - start)
        return latencies

    latencies = asyncio.run(calls())
    return {"requests": len(latencies), "rps": len(latencies) / sum(latencies), **_percentiles(latencies)}


def _replica_pid(class_name: str) -> int:
    alive = list_actors(filters=[("state", "=", "ALIVE")])
    return next(a.pid for a in alive if a.class_name.endswith(f":{class_name}"))


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS since the last reset) in MB of a local process, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in status if line.startswith("Vm")}
    return values["VmRSS"], values["VmHWM"]


def _row(name: str, r: dict) -> str:
    errors = r.get("errors", 0)
    return (
        f"{name:44s} {r['requests']:6d} {errors:6d} {r['rps']:8.2f} "
        f"{r.get('p50', 0):9.1f} {r.get('p95', 0):9.1f} {r.get('p99', 0):9.1f}"
    )


def baselines(settings: ServeSettings, inputs: Inputs, seconds: float) -> dict:
    """The in-process segment and classify numbers the Serve ones are compared with."""
    print(f"in-process baseline ({seconds:.0f} s each) ...", flush=True)
    return {
        "segment": in_process(
            DetectorDeployment, settings, lambda d: d.segment(inputs.image, None, 0, 0), seconds
        ),
        "classify": in_process(
            ClassifierDeployment, settings, lambda c: c.classify(inputs.slice_pixels, None, 5), seconds
        ),
    }


def batched_tests(url: str, inputs: Inputs, clients: int, batch_clients: int, seconds: float) -> dict:
    """Load tests of the application as deployed (batching on)."""
    print(f"serving at {url}; load tests ({seconds:.0f} s each) ...", flush=True)
    return {
        "segment": load_test(f"{url}/v1/segment", inputs.image_body, 1, seconds / 3),
        "segment_many": load_test(f"{url}/v1/segment", inputs.image_body, clients, seconds),
        "classify": load_test(f"{url}/v1/classify", inputs.slice_body, 1, seconds / 3),
        "classify_many": load_test(f"{url}/v1/classify", inputs.slice_body, batch_clients, seconds / 2),
        "volume": load_test(f"{url}/v1/classify", inputs.volume_body, 1, seconds / 3),
    }


def unbatched_tests(url: str, inputs: Inputs, batch_clients: int, seconds: float) -> dict:
    """The same classifier tests with the application redeployed without batching (max_batch_size 1);
    without batching nothing waits for a batch to fill: Serve's own cost per request."""
    return {
        "classify_many": load_test(f"{url}/v1/classify", inputs.slice_body, batch_clients, seconds / 2),
        "volume": load_test(f"{url}/v1/classify", inputs.volume_body, 1, seconds / 3),
        "segment": load_test(f"{url}/v1/segment", inputs.image_body, 1, seconds / 3),
        "classify": load_test(f"{url}/v1/classify", inputs.slice_body, 1, seconds / 3),
    }


def mosaic_test(url: str, mosaic: int, tile_size: int) -> dict:
    """One tiled mosaic through /v1/segment: time, answer, the detector replica's RSS and peak RSS."""
    print(f"tiled mosaic {mosaic} px in {tile_size}-px tiles ...", flush=True)
    pid = _replica_pid("DetectorDeployment")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    rss_before, _ = _memory_mb(pid)
    body = png(sample_mosaic(mosaic))
    start = time.perf_counter()
    params = {"tile_size": tile_size}
    response = requests.post(f"{url}/v1/segment", data=body, params=params, headers=RAW, timeout=3600)
    seconds = time.perf_counter() - start
    rss_after, peak = _memory_mb(pid)
    return {
        "status": response.status_code,
        "result": response.json(),
        "seconds": seconds,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "peak": peak,
    }


def overheads(base: dict, on: dict, off: dict) -> dict[str, float]:
    """What Serve adds at p50 to the in-process call, per endpoint, batching on and off (one client), in
    ms; and the classifier's throughput with batching over without (many clients)."""
    out = {}
    for label, r in (("on", on), ("off", off)):
        for endpoint in ("segment", "classify"):
            out[f"{endpoint}_batching_{label}_ms"] = r[endpoint]["p50"] - base[endpoint]["p50"]
    out["batching_throughput_ratio"] = on["classify_many"]["rps"] / off["classify_many"]["rps"]
    return out


def report(
    settings: ServeSettings, base: dict, on: dict, off: dict, tiled: dict, clients: int, batch_clients: int
) -> None:
    """The table of every test, then the overheads and speed-ups read from it, and the mosaic's line."""
    rows = [
        HEADER,
        _row("segment 256 px, in-process, 1 caller", base["segment"]),
        _row("classify, in-process, 1 caller", base["classify"]),
        _row("segment 256 px, Serve HTTP, 1 client", on["segment"]),
        _row(f"segment 256 px, Serve HTTP, {clients} clients", on["segment_many"]),
        _row("classify, Serve HTTP, 1 client", on["classify"]),
        _row(f"classify, batching on (<= 8), {batch_clients} clients", on["classify_many"]),
        _row("classify a 64^3 volume, batching on, 1 client", on["volume"]),
        _row(f"classify, batching off, {batch_clients} clients", off["classify_many"]),
        _row("classify a 64^3 volume, batching off, 1 client", off["volume"]),
        _row("segment 256 px, Serve HTTP, 1 client, no batching", off["segment"]),
        _row("classify, Serve HTTP, 1 client, no batching", off["classify"]),
    ]
    print("\n".join(rows))
    wait_ms = settings.batch_wait_timeout_s * 1000
    summary = overheads(base, on, off)
    for label in ("on", "off"):
        print(
            f"Serve overhead at p50, 1 client, batching {label}: segment "
            f"{summary[f'segment_batching_{label}_ms']:+.1f} ms, classify "
            f"{summary[f'classify_batching_{label}_ms']:+.1f} ms (goal <= 5 ms; batching on adds up to "
            f"batch_wait_timeout_s = {wait_ms:.0f} ms for a lone request)"
        )
    print(
        f"classifier batching on/off: throughput {summary['batching_throughput_ratio']:.2f}x "
        f"({batch_clients} clients, one slice each); volume latency p50 "
        f"{off['volume']['p50'] / on['volume']['p50']:.2f}x faster (its slices batched together)"
    )
    side, seconds, result = tiled["mosaic"], tiled["seconds"], tiled["result"]
    print(
        f"mosaic {side}x{side}: HTTP {tiled['status']}, {result.get('tiles')} tiles, {result.get('count')} "
        f"instances, {seconds:.1f} s ({seconds / (side * side / 1e6):.2f} s/MP); detector replica RSS "
        f"{tiled['rss_before']:.0f} MB before, {tiled['rss_after']:.0f} MB after, "
        f"peak {tiled['peak']:.0f} MB during the request"
    )


def benchmark_serve(
    detector: str | None,
    classifier: str | None,
    tracking_uri: str | None,
    clients: int = 8,
    seconds: float = 60,
    batch_clients: int = 16,
    mosaic: int = 2048,
    tile_size: int = 512,
    cpus_per_replica: float = 1,
    gpus_per_replica: float = 0,
) -> dict:
    """Print the Serve application's numbers: in-process baselines, load tests with batching on, a tiled
    mosaic, load tests with batching off, and the overheads and speed-ups they give; return them
    ({"in_process", "batching_on", "batching_off", "mosaic", "overheads"})."""
    with tempfile.TemporaryDirectory() as tmp:
        if not detector or not classifier:
            tracking_uri, detector, classifier = random_models(Path(tmp))
        settings = ServeSettings(
            detector=detector,
            classifier=classifier,
            tracking_uri=tracking_uri,
            cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica,
        )
        inputs = sample_inputs()
        torch.set_num_threads(max(1, int(cpus_per_replica)))  # the replicas' thread count
        base = baselines(settings, inputs, seconds / 3)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        init_ray(None, str(REPO))  # as platform.serve starts it
        try:
            start_app(settings, {**HTTP_DEFAULTS, "host": "127.0.0.1", "port": port})  # the CLI's options
            on = batched_tests(url, inputs, clients, batch_clients, seconds)
            tiled = {"mosaic": mosaic, **mosaic_test(url, mosaic, tile_size)}
            serve.run(application(replace(settings, max_batch_size=1)), name=APP_NAME, route_prefix="/")
            off = unbatched_tests(url, inputs, batch_clients, seconds)
        finally:
            serve.shutdown()
            ray.shutdown()
    report(settings, base, on, off, tiled, clients, batch_clients)
    result = tiled.pop("result")  # the instances themselves; of them only their count and tiles are kept
    tiled.update(tiles=result.get("tiles"), count=result.get("count"))
    summary = overheads(base, on, off)
    return {"in_process": base, "batching_on": on, "batching_off": off, "mosaic": tiled, "overheads": summary}
