"""`python -m platform.serve` for real: a small trained detector and slice classifier registered in a
temporary MLflow store and a slice library, the Ray Serve application started by the CLI (local Ray,
settings from a Serve config file; the `store` and `server` fixtures of conftest.py), every endpoint
called over HTTP on 127.0.0.1, the alias moved while requests run, Ctrl-C."""

import io
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_utils

from tests.helpers import SHARED_DATA, run_cli
from tests.serving import (
    ADRENAL,
    CLASSIFIER,
    DETECTOR,
    OPERATING_POINT,
    RAW,
    SHELL,
    clean_env,
    library_folder,
    start_server,
)
from tests.test_cli_errors import _assert_user_error as assert_user_error

IMAGES = sorted((SHARED_DATA / "dsb2018" / "stage1_train").glob("*/images/*.png"))
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def post(server, path: str, body: bytes, **params) -> requests.Response:
    return requests.post(f"{server.url}{path}", data=body, params=params, headers=RAW, timeout=120)


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


def in_process(store: str, pixels: np.ndarray, score_threshold: float | None) -> dict:
    """What the served detector, loaded in this process (deploy.registry.predict_image), finds."""
    from deploy.registry import load_detector, predict_image
    from deploy.reloading import use_registry

    use_registry(store)
    try:
        return predict_image(load_detector(f"models:/{DETECTOR}/1"), pixels, score_threshold)
    finally:
        use_registry("")


def assert_same_instances(result: dict, reference: dict) -> None:
    assert result["count"] == len(reference["scores"])
    np.testing.assert_allclose([i["score"] for i in result["instances"]], reference["scores"], rtol=1e-5)
    served = np.stack([mask_utils.decode(i["mask"]) for i in result["instances"]]).astype(bool)
    # Same masks, up to pixels whose mask probability sits at the 0.5 threshold (the replica runs torch
    # on one thread, this process on two: float sums in another order).
    differ = (served != reference["masks"]).sum(axis=(1, 2))
    assert (differ <= 0.02 * np.maximum(served.sum(axis=(1, 2)), 1)).all(), differ


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

    assert_same_instances(result, in_process(store, load_image(IMAGES[0]), 0.3))

    fewer = post(server, "/v1/segment", body, score_threshold=0.3, max_detections=3).json()
    assert fewer["count"] == 3 and fewer["instances"] == result["instances"][:3]

    # Unasked, the model's operating point (its config's score_threshold), as in process and in predict
    every = post(server, "/v1/segment", body, score_threshold=0.0).json()
    default = post(server, "/v1/segment", body).json()
    assert_same_instances(default, in_process(store, load_image(IMAGES[0]), None))
    assert (
        every["count"] > default["count"] and min(i["score"] for i in default["instances"]) >= OPERATING_POINT
    )


def test_segment_16_bit_tiff_jpeg_and_a_tiled_mosaic(server, store, tmp_path):
    import tifffile

    from datasets.microscopy import read_image
    from datasets.records import to_rgb8

    # 16-bit as a microscope writes it: 256 grey levels above an offset, one hot pixel, LZW (Fiji's).
    grey = np.asarray(Image.open(IMAGES[1]).convert("L")).astype(np.uint16) + 1000
    grey[0, 0] = 65535
    tifffile.imwrite(tmp_path / "grey16.tif", grey, compression="lzw")
    response = post(server, "/v1/segment", (tmp_path / "grey16.tif").read_bytes(), score_threshold=0.3)
    assert response.status_code == 200, response.text
    result = response.json()
    check_segmentation(result, *grey.shape)
    # The model gets the 16-bit pixels and its own normalisation (grey: percentiles), as platform.predict
    # reads the file; squashed to 8-bit first, the levels fall onto ~4 and the model sees another image.
    pixels = read_image(tmp_path / "grey16.tif").pixels
    assert_same_instances(result, in_process(store, pixels, 0.3))
    squashed = in_process(store, to_rgb8(pixels), 0.3)
    assert len(squashed["scores"]) != result["count"] or not np.allclose(
        squashed["scores"], [i["score"] for i in result["instances"]], rtol=1e-3
    )

    jpeg = np.asarray(Image.open(IMAGES[1]).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(jpeg).save(buffer, "JPEG")
    response = post(server, "/v1/segment", buffer.getvalue(), score_threshold=0.3)
    assert response.status_code == 200, response.text
    check_segmentation(response.json(), *jpeg.shape[:2])

    # A 3-channel TIFF stack: a plane and a channel are chosen as platform.predict's --page and --channel.
    stack = np.stack([np.stack([grey, grey // 2, grey // 3])] * 2)
    tifffile.imwrite(tmp_path / "zc.tif", stack, metadata={"axes": "ZCYX"})
    body = (tmp_path / "zc.tif").read_bytes()
    response = post(server, "/v1/segment", body, score_threshold=0.3)
    assert response.status_code == 422 and "choose one with page" in response.json()["error"], response.text
    response = post(server, "/v1/segment", body, score_threshold=0.3, page=1, channel=0)
    assert response.status_code == 200, response.text
    assert_same_instances(response.json(), in_process(store, pixels, 0.3))  # plane 1, channel 0 is `grey`

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
        "library": True,
    }
    models = requests.get(f"{server.url}/v1/models", timeout=10).json()["models"]
    assert [(m["role"], m["name"]) for m in models] == [("detector", DETECTOR), ("classifier", CLASSIFIER)]
    for m in models:
        assert "champion" in m["aliases"] and m["metrics"]["val_loss"] == 1.25
    # the headline: the registered metric beside the baseline's, and the data it was measured on
    assert models[0]["headline"] == [{"name": "segm_AP", "value": 0.5, "baseline": 0.25}]
    assert models[1]["headline"] == [{"name": "volume_auc", "value": 0.5, "baseline": None}]
    assert models[0]["validation"]["name"] == "data (validation)"
    assert models[0]["validation"]["profile"]["images"] == 1 and models[1]["validation"] is None
    assert models[0]["run_url"] is None  # a local store has no web UI to link to
    assert models[1]["classes"] == ["ball", "box"]
    docs = requests.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    expected = {"/v1/segment", "/v1/classify", "/v1/crop", "/v1/preview", "/v1/match", "/v1/library"}
    assert expected | {"/v1/library/view", "/v1/models", "/healthz"} <= set(paths)


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

    from deploy.reloading import use_registry

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


def test_a_library_only_server_and_ctrl_c(tmp_path):
    """No model at all: the page's Find in 3D alone; model endpoints say what is missing. Ctrl-C stops it."""
    library = library_folder(tmp_path / "library", ADRENAL[:1])
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    server = start_server(empty, "--library", str(library), log=tmp_path / "log")
    try:
        health = requests.get(f"{server.url}/healthz", timeout=10).json()
        assert health == {"status": "ok", "detector": False, "classifier": False, "library": True}
        response = post(server, "/v1/segment", IMAGES[0].read_bytes())
        assert response.status_code == 404 and "--detector" in response.json()["error"]
        assert requests.get(f"{server.url}/v1/models", timeout=10).json() == {"models": []}
        volumes = requests.get(f"{server.url}/v1/library", timeout=10).json()["volumes"]
        assert [v["name"] for v in volumes] == [ADRENAL[0].name]
    finally:
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
    assert_user_error(result, "models:/dsb2018_quick@champion", "run `make demo` first")


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def decoded_png(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_match_finds_a_rotated_slice_and_shows_where_it_lies(server):
    from scipy import ndimage

    from datasets.volumes import load_volume

    library = requests.get(f"{server.url}/v1/library", timeout=10).json()
    names = [v["name"] for v in library["volumes"]]
    assert names == sorted([SHELL.name, *(p.name for p in ADRENAL[:3])])
    assert library["slices"] == sum(v["slices"] for v in library["volumes"]) > 0

    volume = load_volume(SHELL)
    query = ndimage.rotate(volume[:, 70, :], 90, reshape=True, order=1)  # axis 1, index 70, turned 90 CCW
    response = post(server, "/v1/match", png_bytes(query), top_k=3)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["searched"] == library["slices"] and len(result["matches"]) == 3
    best = result["matches"][0]
    assert (best["volume"], best["axis"]) == (SHELL.name, 1) and abs(best["index"] - 70) <= 2, best
    assert min(abs(best["angle"] - 270), 360 - abs(best["angle"] - 270)) <= 10, best  # (-90) % 360
    assert best["shape"] == list(volume.shape) and best["position"] == pytest.approx(best["index"] / 127)

    # only the adrenal volumes: the shell cannot be found
    only = [ADRENAL[0].name, ADRENAL[1].name]
    restricted = post(server, "/v1/match", png_bytes(query), top_k=5, volume=only).json()
    assert {m["volume"] for m in restricted["matches"]} <= set(only)
    slices = {v["name"]: v["slices"] for v in library["volumes"]}
    assert restricted["searched"] == slices[only[0]] + slices[only[1]]

    # the matched slice as PNG is the volume's slice; its position is a projection with the plane in red
    view = f"{server.url}/v1/library/view"
    params = {"volume": SHELL.name, "axis": 1, "index": 70}
    assert np.array_equal(decoded_png(requests.get(view, params=params, timeout=30)), volume[:, 70, :])
    position = decoded_png(requests.get(view, params={**params, "kind": "position"}, timeout=30))
    assert position.shape == (volume.shape[0], volume.shape[1], 3)  # projected along axis 2
    assert (position[:, 70] == [255, 64, 64]).all()  # axis 1 is the projection's columns
    assert np.array_equal(position[:, 69, 0], volume[:, 69, :].max(axis=1))


def test_match_and_library_errors(server):
    image = IMAGES[0].read_bytes()

    def view(**params):
        return requests.get(f"{server.url}/v1/library/view", params=params, timeout=10)

    cases = [
        (post(server, "/v1/match", image, volume="nope.nii.gz"), 422, "unknown volume"),
        (post(server, "/v1/match", png_bytes(np.full((32, 32), 9, np.uint8))), 422, "uniform"),
        (post(server, "/v1/match", image, top_k=0), 422, "top_k"),
        (view(volume="nope", axis=0, index=0), 404, "nope"),
        (view(volume=SHELL.name, axis=0, index=999), 422, "index"),
        (view(volume=SHELL.name, axis=3, index=0), 422, "axis"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]


def test_crop_preview_and_classify_the_cropped_object(server):
    from datasets.cropping import crop_object
    from deploy.inputs import decode_image

    body = IMAGES[3].read_bytes()
    image = decode_image(body, 10**8, 2**30)
    assert np.array_equal(decoded_png(post(server, "/v1/preview", body)), image)

    response = post(server, "/v1/crop", body, sensitivity=0.7)
    expected = crop_object(image, sensitivity=0.7)
    assert np.array_equal(decoded_png(response), expected.image)
    assert response.headers["x-crop-box"] == ",".join(map(str, expected.box))

    # classify?crop=true classifies exactly what /v1/crop showed
    cropped = post(server, "/v1/classify", body, crop="true", sensitivity=0.7, top_k=2).json()
    direct = post(server, "/v1/classify", png_bytes(expected.image), top_k=2).json()
    assert [t["class"] for t in cropped["top"]] == [t["class"] for t in direct["top"]]
    for a, b in zip(cropped["top"], direct["top"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)

    uniform = post(server, "/v1/crop", png_bytes(np.zeros((20, 20), np.uint8)))
    assert uniform.status_code == 422 and "uniform" in uniform.json()["error"]


def test_the_page_and_its_files_are_served(server):
    page = requests.get(server.url, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # everything it loads comes from the application itself (it must work offline)
    assert "http" not in page.text.split("<body>")[0].replace('name="viewport"', "")
    for name, kind in (("page.js", "javascript"), ("page.css", "text/css")):
        response = requests.get(f"{server.url}/static/{name}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert requests.get(f"{server.url}/static/../app.py", timeout=10).status_code == 404
