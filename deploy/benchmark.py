"""`python -m platform.bench serve`: the Serve application under load over loopback HTTP, side by side with
the same deployment code called in-process; the classifier with and without dynamic batching; a tiled
mosaic through the endpoint with the detector replica's peak memory.

Models: the registered ones given, else random-init models of the CPU recipes (dsb2018_demo detector,
adrenal3d_cpu classifier) registered in a temporary store. Weights do not change the work per request
much: an untrained Mask R-CNN fills its 100 detection slots, about what a dense nuclei image gives.
"""

import asyncio
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import requests
import torch
from PIL import Image

from deploy.app import (
    ClassifierDeployment,
    DetectorDeployment,
    ServeSettings,
    application,
    grouped,
    run_classifier,
    run_detector,
    use_registry,
)

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample" / "dsb2018"


def random_models(root: Path) -> tuple[str, str, str]:
    """(tracking URI, detector URI, classifier URI) of untrained models registered under root."""
    from deploy.registry import log_checkpoint, register
    from trainers.classification.model import build_classifier, save_classifier
    from trainers.config import apply_overrides
    from trainers.detection.model import build_model
    from trainers.detection.train import save_checkpoint
    from trainers.recipes import get_recipe

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


def load_test(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads posting `body` back to back for `seconds`: requests/s, latency quantiles, errors."""
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client():
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = session.post(url, data=body, timeout=600)
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


def in_process(deployment, run, settings: ServeSettings, call, seconds: float) -> dict:
    """The deployment's own class, constructed in this process, called back to back for `seconds`: what a
    request costs without HTTP, the proxy, the ingress, the handle and the batching queue (@serve.batch
    only runs inside a replica; `run` is the model call the batch would make)."""
    instance = deployment.func_or_class(settings)

    async def unbatched(item):
        return (await asyncio.to_thread(grouped, [item], run))[0]

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
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")])
    return next(a.pid for a in alive if a.class_name.endswith(f":{class_name}"))


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS since the last reset) in MB of a local process, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in status if line.startswith("Vm")}
    return values["VmRSS"], values["VmHWM"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _row(name: str, r: dict) -> str:
    errors = r.get("errors", 0)
    return (
        f"{name:44s} {r['requests']:6d} {errors:6d} {r['rps']:8.2f} "
        f"{r.get('p50', 0):9.1f} {r.get('p95', 0):9.1f} {r.get('p99', 0):9.1f}"
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
) -> None:
    import ray
    from ray import serve

    from datasets.records import load_image
    from platform.benchmarks.tiled import sample_mosaic
    from trainers.ray_seam import init_ray

    tmp = tempfile.TemporaryDirectory()
    if not detector or not classifier:
        tracking_uri, detector, classifier = random_models(Path(tmp.name))
    settings = ServeSettings(
        detector=detector, classifier=classifier, tracking_uri=tracking_uri, cpus_per_replica=cpus_per_replica
    )
    image_path = sorted(SAMPLE.glob("*/images/*.png"))[0]
    image_body = image_path.read_bytes()
    image = load_image(image_path)
    slice_pixels = np.repeat(image[:224, :224, :1], 3, axis=2)
    slice_body = _png(slice_pixels[..., 0])
    volume_body = sorted((SAMPLE.parent / "adrenal3d" / "volumes").glob("*.nii.gz"))[0].read_bytes()
    torch.set_num_threads(max(1, int(cpus_per_replica)))  # the replicas' thread count
    header = (
        f"{'':44s} {'reqs':>6s} {'errors':>6s} {'req/s':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s}"
    )
    rows = [header]

    print(f"in-process baseline ({seconds / 3:.0f} s each) ...", flush=True)
    base_det = in_process(
        DetectorDeployment, run_detector, settings, lambda d: d.segment(image, 0.0, 0, 0), seconds / 3
    )
    base_cls = in_process(
        ClassifierDeployment,
        run_classifier,
        settings,
        lambda c: c.classify(slice_pixels, None, 5),
        seconds / 3,
    )
    rows += [
        _row("segment 256 px, in-process, 1 caller", base_det),
        _row("classify, in-process, 1 caller", base_cls),
    ]

    port = free_port()
    init_ray(None, str(Path(__file__).resolve().parents[1]))  # as platform.serve starts it
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(application(settings), name="foram", route_prefix="/")
        print(f"serving at {url}; load tests ({seconds:.0f} s each) ...", flush=True)
        one = load_test(f"{url}/v1/segment", image_body, 1, seconds / 3)
        many = load_test(f"{url}/v1/segment", image_body, clients, seconds)
        cls_one = load_test(f"{url}/v1/classify", slice_body, 1, seconds / 3)
        batched = load_test(f"{url}/v1/classify", slice_body, batch_clients, seconds / 2)
        volume = load_test(f"{url}/v1/classify", volume_body, 1, seconds / 3)
        rows += [
            _row("segment 256 px, Serve HTTP, 1 client", one),
            _row(f"segment 256 px, Serve HTTP, {clients} clients", many),
            _row("classify, Serve HTTP, 1 client", cls_one),
            _row(f"classify, batching on (<= 8), {batch_clients} clients", batched),
            _row("classify a 64^3 volume, batching on, 1 client", volume),
        ]

        print(f"tiled mosaic {mosaic} px in {tile_size}-px tiles ...", flush=True)
        pid = _replica_pid("DetectorDeployment")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
        rss_before, _ = _memory_mb(pid)
        mosaic_body = _png(sample_mosaic(mosaic))
        start = time.perf_counter()
        response = requests.post(
            f"{url}/v1/segment", data=mosaic_body, params={"tile_size": tile_size}, timeout=3600
        )
        mosaic_s = time.perf_counter() - start
        result = response.json()
        rss_after, peak = _memory_mb(pid)

        serve.run(application(ServeSettings(**{**settings.__dict__, "max_batch_size": 1})), name="foram")
        unbatched = load_test(f"{url}/v1/classify", slice_body, batch_clients, seconds / 2)
        volume_nb = load_test(f"{url}/v1/classify", volume_body, 1, seconds / 3)
        # Without batching nothing waits for a batch to fill: Serve's own cost per request.
        one_nb = load_test(f"{url}/v1/segment", image_body, 1, seconds / 3)
        cls_one_nb = load_test(f"{url}/v1/classify", slice_body, 1, seconds / 3)
        rows += [
            _row(f"classify, batching off, {batch_clients} clients", unbatched),
            _row("classify a 64^3 volume, batching off, 1 client", volume_nb),
            _row("segment 256 px, Serve HTTP, 1 client, no batching", one_nb),
            _row("classify, Serve HTTP, 1 client, no batching", cls_one_nb),
        ]
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    print("\n".join(rows))
    for label, seg, cls in (("batching on", one, cls_one), ("batching off", one_nb, cls_one_nb)):
        print(
            f"Serve overhead at p50, 1 client, {label}: segment {seg['p50'] - base_det['p50']:+.1f} ms, "
            f"classify {cls['p50'] - base_cls['p50']:+.1f} ms (goal <= 5 ms; batching on adds up to "
            f"batch_wait_timeout_s = {settings.batch_wait_timeout_s * 1000:.0f} ms for a lone request)"
        )
    print(
        f"classifier batching on/off: throughput {batched['rps'] / unbatched['rps']:.2f}x "
        f"({batch_clients} clients, one slice each); volume latency p50 "
        f"{volume_nb['p50'] / volume['p50']:.2f}x faster (its slices batched together)"
    )
    print(
        f"mosaic {mosaic}x{mosaic}: HTTP {response.status_code}, {result.get('tiles')} tiles, "
        f"{result.get('count')} instances, {mosaic_s:.1f} s ({mosaic_s / (mosaic * mosaic / 1e6):.2f} s/MP); "
        f"detector replica RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after, peak {peak:.0f} MB "
        "during the request"
    )
