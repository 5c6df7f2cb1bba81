"""`python -m platform.serve` for real: a small trained detector and slice classifier registered in a
temporary MLflow store, the Ray Serve application started by the CLI (local Ray, settings from a Serve
config file), every endpoint called over HTTP on 127.0.0.1, the alias moved while requests run, Ctrl-C."""

import io
import threading
import time

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from tests.helpers import REPO, SHARED_DATA, run_cli
from tests.serving import CLASSIFIER, DETECTOR, clean_env, register_models, start_server
from tests.test_cli_errors import _assert_user_error as assert_user_error

IMAGES = sorted((SHARED_DATA / "dsb2018" / "stage1_train").glob("*/images/*.png"))
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return register_models(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """The CLI on a free port, its settings from a copy of deploy/serve.yaml (as a user would edit it)."""
    root = tmp_path_factory.mktemp("server")
    doc = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    doc["applications"][0]["args"].update(
        detector=f"models:/{DETECTOR}@champion",
        classifier=f"models:/{CLASSIFIER}@champion",
        max_upload_mb=1,
        reload_on_alias=True,
        reload_interval_s=1,
    )
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump(doc))
    server = start_server(store, "--config", str(config), log=root / "serve.log")
    yield server
    server.stop()


def post(server, path: str, body: bytes, **params) -> requests.Response:
    return requests.post(f"{server.url}{path}", data=body, params=params, timeout=120)


def check_segmentation(result: dict, height: int, width: int) -> None:
    """The invariants of a /v1/segment answer, checked with pycocotools."""
    instances = result["instances"]
    assert result["count"] == len(instances) == sum(result["counts"].values())
    assert (result["height"], result["width"]) == (height, width)
    by_class = {}
    for inst in instances:
        by_class[inst["class"]] = by_class.get(inst["class"], 0) + 1
        mask = mask_utils.decode(inst["mask"])
        assert mask.shape == (height, width)
        assert inst["area"] == int(mask.sum()) == int(mask_utils.area(inst["mask"]))
        x1, y1, x2, y2 = inst["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        if inst["area"]:  # the mask lies inside its box (boxes are the model's, masks pasted into them)
            rows, cols = np.nonzero(mask)
            assert cols.min() >= np.floor(x1) - 1 and cols.max() <= np.ceil(x2) + 1
            assert rows.min() >= np.floor(y1) - 1 and rows.max() <= np.ceil(y2) + 1
    assert {k: v for k, v in result["counts"].items() if v} == by_class
    scores = [inst["score"] for inst in instances]
    assert scores == sorted(scores, reverse=True)


def test_segment_a_sample_image_as_the_model_does_in_process(server, store):
    body = IMAGES[0].read_bytes()
    response = post(server, "/v1/segment", body, score_threshold=0.3)
    assert response.status_code == 200, response.text
    result = response.json()
    height, width = Image.open(IMAGES[0]).size[::-1]
    check_segmentation(result, height, width)
    assert result["models"]["detector"] == {"name": DETECTOR, "version": "1"}
    assert result["count"] > 0 and min(i["score"] for i in result["instances"]) >= 0.3

    # The same registered model run in this process (deploy.registry.predict_image) finds the same instances.
    from datasets.records import load_image
    from deploy.app import use_registry
    from deploy.registry import load_detector, predict_image

    use_registry(store)
    try:
        reference = predict_image(load_detector(f"models:/{DETECTOR}/1"), load_image(IMAGES[0]), 0.3)
    finally:
        use_registry("")
    assert result["count"] == len(reference["scores"])
    np.testing.assert_allclose([i["score"] for i in result["instances"]], reference["scores"], rtol=1e-5)
    served = np.stack([mask_utils.decode(i["mask"]) for i in result["instances"]]).astype(bool)
    # Same masks, up to pixels whose mask probability sits at the 0.5 threshold (the replica runs torch
    # on one thread, this process on two: float sums in another order).
    differ = (served != reference["masks"]).sum(axis=(1, 2))
    assert (differ <= 0.02 * np.maximum(served.sum(axis=(1, 2)), 1)).all(), differ

    fewer = post(server, "/v1/segment", body, score_threshold=0.3, max_detections=3).json()
    assert fewer["count"] == 3 and fewer["instances"] == result["instances"][:3]


def test_segment_16_bit_tiff_jpeg_and_a_tiled_mosaic(server):
    grey = np.asarray(Image.open(IMAGES[1]).convert("L")).astype(np.uint16) * 257
    for fmt, array in (("TIFF", grey), ("JPEG", np.asarray(Image.open(IMAGES[1]).convert("RGB")))):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, fmt)
        response = post(server, "/v1/segment", buffer.getvalue(), score_threshold=0.3)
        assert response.status_code == 200, (fmt, response.text)
        check_segmentation(response.json(), *array.shape[:2])

    # A 2 x 2 mosaic of sample images in 256-px tiles (64 px overlap): 9 tiles, stitched.
    tiles = [np.asarray(Image.open(p).convert("RGB").resize((256, 256))) for p in IMAGES[:4]]
    mosaic = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
    buffer = io.BytesIO()
    Image.fromarray(mosaic).save(buffer, "PNG")
    response = post(server, "/v1/segment", buffer.getvalue(), score_threshold=0.5, tile_size=256)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["tiles"] == 9
    check_segmentation(result, 512, 512)


def test_classify_a_slice_and_a_volume(server, store):
    volumes = sorted((SHARED_DATA / "microct_shell").glob("*.nii.gz"))
    response = post(server, "/v1/classify", volumes[0].read_bytes(), top_k=2)
    assert response.status_code == 200, response.text
    result = response.json()
    assert [t["class"] for t in result["top"]] and len(result["top"]) == 2
    assert sum(t["probability"] for t in result["top"]) == pytest.approx(1.0, abs=1e-4)  # 2 classes
    assert result["slices"] and {s["axis"] for s in result["slices"]} <= {0, 1, 2}
    assert result["models"]["classifier"] == {"name": CLASSIFIER, "version": "1"}
    # The volume's answer is the mean of its slices' (the classifier's `aggregate`).
    per_slice = {t["class"]: [] for t in result["top"]}
    for s in result["slices"]:
        for t in s["top"]:
            per_slice[t["class"]].append(t["probability"])
    for t in result["top"]:
        assert t["probability"] == pytest.approx(np.mean(per_slice[t["class"]]), abs=1e-5)

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8) + 200).save(buffer, "PNG")
    response = post(server, "/v1/classify", buffer.getvalue(), top_k=1)
    assert response.status_code == 200, response.text
    assert len(response.json()["top"]) == 1 and "slices" not in response.json()


def test_models_health_and_docs(server):
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {
        "status": "ok",
        "detector": True,
        "classifier": True,
    }
    models = requests.get(f"{server.url}/v1/models", timeout=10).json()["models"]
    assert [(m["role"], m["name"]) for m in models] == [("detector", DETECTOR), ("classifier", CLASSIFIER)]
    for m in models:
        assert "champion" in m["aliases"] and m["metrics"]["val_metric"] == 0.5
    assert models[1]["classes"] == ["ball", "box"]
    docs = requests.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/segment", "/v1/classify", "/v1/models", "/healthz"} <= set(paths)


def test_bad_inputs_are_4xx_json_and_the_replicas_survive(server):
    import nibabel as nib

    from tests.test_serve_inputs import png_claiming

    image = IMAGES[0].read_bytes()
    flat = nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)).to_bytes()
    cases = [
        ("/v1/segment", b"", {}, 400),
        ("/v1/segment", b"%PDF-1.4 not an image", {}, 415),
        ("/v1/segment", image[:2000], {}, 400),  # truncated
        ("/v1/segment", png_claiming(0, 10), {}, 400),  # zero-size
        ("/v1/segment", png_claiming(40000, 40000), {}, 413),  # decompression bomb
        ("/v1/segment", np.random.default_rng(0).bytes(1_200_000), {}, 413),  # over max_upload_mb=1
        ("/v1/segment", image, {"score_threshold": "high"}, 422),
        ("/v1/segment", image, {"score_threshold": 1.5}, 422),
        ("/v1/segment", image, {"max_detections": -1}, 422),
        ("/v1/segment", image, {"tile_size": 8}, 422),
        ("/v1/classify", image, {"top_k": 0}, 422),
        ("/v1/classify", flat, {}, 400),  # a 2D NIfTI
        ("/v1/classify", b"\x1f\x8b" + b"\x00" * 100, {}, 415),  # gzip, but not a volume
    ]
    for path, body, params, status in cases:
        response = post(server, path, body, **params)
        assert response.status_code == status, (path, params, status, response.text[:300])
        if status != 200:
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"], response.text
    assert requests.get(f"{server.url}/v1/segment", timeout=10).status_code == 405
    # Nothing crashed: the same replicas still answer.
    assert post(server, "/v1/segment", image, score_threshold=0.5).status_code == 200
    assert "Traceback" not in server.output().split("ready: http")[-1]


def test_reload_on_alias_without_dropping_requests(server, store):
    """Version 2 is registered and `champion` moved to it while a client keeps sending images: every
    request succeeds, and the answering version goes from 1 to 2 and stays there."""
    import mlflow

    from deploy.app import use_registry

    body = IMAGES[2].read_bytes()
    versions, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            response = post(server, "/v1/segment", body, score_threshold=0.5)
            if response.status_code != 200:
                failures.append(response.text)
            else:
                versions.append(response.json()["models"]["detector"]["version"])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        use_registry(store)
        client_api = mlflow.MlflowClient()
        source = client_api.get_model_version(DETECTOR, "1").source
        new = str(mlflow.register_model(source, DETECTOR).version)
        client_api.set_registered_model_alias(DETECTOR, "champion", new)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            models = requests.get(f"{server.url}/v1/models", timeout=10).json()["models"]
            if models[0]["version"] == new and versions[-3:] == [new] * 3:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        use_registry("")
    assert not failures
    assert versions[0] == "1" and versions[-1] == new == "2", versions
    switched = versions.index("2")
    assert set(versions[:switched]) == {"1"} and set(versions[switched:]) == {"2"}, versions


def test_ctrl_c_stops_cleanly(server):
    """Last in this module: it stops the shared server."""
    assert server.stop() == 0
    assert "stopped" in server.output()


def test_cli_errors_are_one_line(store, tmp_path):
    env = clean_env()
    cases = [
        (("--detector", "models:/nope@champion"), "models:/nope@champion: not in the model registry"),
        (("--detector", "runs:/abc/model"), "not a registered model; expected models:/NAME@alias"),
        (("--config", str(tmp_path / "missing.yaml")), "missing.yaml not found"),
    ]
    for args, message in cases:
        result = run_cli("platform.serve", "--tracking-uri", store, *args, env=env, timeout=120)
        assert_user_error(result, message)
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run_cli("platform.serve", "--tracking-uri", empty, env=env, timeout=120)
    assert_user_error(result, "models:/dsb2018_demo@champion", "run `make demo` first")
