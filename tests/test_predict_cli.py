"""`python -m platform.predict` as a scientist runs it, on the registered models of the test store: a folder
of PNG, 16-bit TIFF and OME-TIFF images with a damaged file among them; the label images, COCO file,
objects and counts agree with each other; micrometres where the file gives a pixel size; a second run
resumes, with the same model and settings only; user mistakes are one line; a classifier writes a row per
volume."""

import csv
import json
import shutil

import mlflow
import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datasets.errors import UserError
from datasets.label_images import read_label_image
from deploy.batch import check_resumable
from tests.classifier_data import write_volumes
from tests.helpers import SAMPLE, run_cli
from tests.serving import CLASSIFIER, DETECTOR, OPERATING_POINT, clean_env

PIXEL_SIZE = 0.65  # micrometres, written into the OME-TIFF


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two sample PNGs, one as a 16-bit TIFF, one as an OME-TIFF with a pixel size, and a truncated PNG."""
    root = tmp_path_factory.mktemp("images")
    pngs = sorted(SAMPLE.glob("*/images/*.png"))[:2]
    (root / "plate").mkdir()
    for png in pngs:
        shutil.copy(png, root / "plate" / f"{png.stem[:8]}.png")
    grey = np.asarray(Image.open(pngs[0]).convert("L")).astype(np.uint16) * 257  # full 16-bit range
    tifffile.imwrite(root / "plate" / "sixteen.tif", grey)
    ome = {"PhysicalSizeX": PIXEL_SIZE, "PhysicalSizeY": PIXEL_SIZE, "axes": "YX"}
    tifffile.imwrite(root / "ome.ome.tif", grey, ome=True, metadata=ome)
    (root / "plate" / "broken.png").write_bytes(pngs[1].read_bytes()[:100])
    return root


def predict(store, *args):
    return run_cli("platform.predict", *args, "--tracking-uri", store, env=clean_env())


@pytest.fixture(scope="module")
def first_run(store, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "out"
    result = predict(store, "--model", f"models:/{DETECTOR}@champion", str(images), "--out", str(out),
                     "--overlays", "--mlflow", "--experiment", "predict-test")  # fmt: skip
    return result, out


def champion_version(store: str) -> str:
    """The version the alias names now (test_serve.py moves it when it runs first in the session)."""
    return str(mlflow.MlflowClient(store, store).get_model_version_by_alias(DETECTOR, "champion").version)


def test_a_damaged_file_is_reported_and_the_rest_predicted(first_run, store):
    result, out = first_run
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 5 files failed" in result.stderr and "broken.png" in result.stderr
    assert "Traceback" not in result.stderr
    names = sorted(p.stem for p in (out / "labels").glob("*.tif"))
    assert len(names) == 4 and "plate__broken" not in names
    assert sorted(p.stem for p in (out / "overlays").glob("*.png")) == names
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["name"] == DETECTOR and record["model"]["version"] == champion_version(store)
    assert [f["file"].endswith("broken.png") for f in record["failed"]] == [True]


def test_labels_coco_objects_and_counts_agree(first_run):
    _, out = first_run
    coco = COCO(str(out / "predictions.json"))  # pycocotools reads it as a dataset
    with open(out / "objects.csv") as f:
        objects = list(csv.DictReader(f))
    with open(out / "counts.csv") as f:
        counts = list(csv.DictReader(f))
    assert len(objects) == len(coco.anns) == int(counts[-1]["total"]) > 0
    assert counts[-1]["image"] == "total" and len(counts) == 5
    for image in coco.dataset["images"]:
        name = image["name"]
        labels = read_label_image(out / "labels" / f"{name}.tif")
        annotations = coco.imgToAnns[image["id"]]
        assert labels.max() == len(annotations) == int(next(r for r in counts if r["image"] == name)["total"])
        for a in annotations:
            mask = mask_utils.decode(a["segmentation"]).astype(bool)
            assert np.array_equal(mask, labels == a["object_id"])
            row = next(o for o in objects if o["image"] == name and int(o["object_id"]) == a["object_id"])
            assert float(row["area_px"]) == mask.sum() == a["area"]
            assert float(row["score"]) == pytest.approx(a["score"])


def test_the_objects_are_those_at_the_models_operating_point(store, images, first_run, tmp_path):
    _, out = first_run
    assert json.loads((out / "run.json").read_text())["settings"]["score_threshold"] == OPERATING_POINT
    png = sorted((images / "plate").glob("*.png"))[0]
    with open(out / "objects.csv") as f:
        reported = [float(r["score"]) for r in csv.DictReader(f) if r["image"] == f"plate__{png.stem}"]
    model = f"models:/{DETECTOR}@champion"
    result = predict(
        store, "--model", model, str(png), "--out", str(tmp_path / "all"), "--score-threshold", "0"
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "all" / "objects.csv") as f:
        every = [float(r["score"]) for r in csv.DictReader(f)]
    assert reported and min(reported) >= OPERATING_POINT
    assert len(every) > len(reported)  # the model found more, below its operating point
    assert sorted(s for s in every if s >= OPERATING_POINT) == pytest.approx(sorted(reported))


def test_micrometres_come_from_the_ome_pixel_size(first_run):
    _, out = first_run
    with open(out / "objects.csv") as f:
        objects = list(csv.DictReader(f))
    ome = [o for o in objects if o["image"] == "ome"]
    others = [o for o in objects if o["image"] != "ome"]
    assert ome and others
    for o in ome:
        assert float(o["area_um2"]) == pytest.approx(float(o["area_px"]) * PIXEL_SIZE**2)
        assert float(o["equivalent_diameter_um"]) == pytest.approx(
            float(o["equivalent_diameter_px"]) * PIXEL_SIZE
        )
    assert all(o["area_um2"] == "" for o in others)


def test_the_run_is_logged_to_mlflow(first_run, store):
    _, out = first_run
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("predict-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.tags["model_version"] == champion_version(store) and run.data.metrics["images"] == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"objects.csv", "counts.csv", "summary.png", "run.json"} <= artifacts


def test_outputs_inside_an_input_folder_are_not_inputs(store, images, tmp_path):
    folder = tmp_path / "plate"
    shutil.copytree(images / "plate", folder)
    (folder / "broken.png").unlink()
    out = folder / "results"
    for _ in range(2):  # the second run finds results/labels/*.tif in the folder and leaves them out
        result = predict(store, "--model", f"models:/{DETECTOR}@champion", str(folder), "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "run.json").read_text())["images"]) == 3


def test_a_second_run_skips_finished_images(store, first_run, images):
    _, out = first_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.tif")}
    result = predict(store, "--model", f"models:/{DETECTOR}@champion", str(images), "--out", str(out))
    assert result.returncode == 1 and "4 of 5 images done in an earlier run" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.tif")} == before
    other = predict(store, "--model", f"models:/{CLASSIFIER}@champion", str(images), "--out", str(out))
    assert other.returncode == 2 and "choose another --out" in other.stderr


def test_a_resumed_run_keeps_the_models_settings(store, images, tmp_path):
    """A run stopped before its end (no run.json yet) resumes only with the settings its images were made
    with: objects cut at two score thresholds or measured with two pixel sizes never share a table."""
    png = sorted((images / "plate").glob("*.png"))[0]
    out = tmp_path / "out"
    model = ["--model", f"models:/{DETECTOR}@champion", str(png), "--out", str(out)]
    assert predict(store, *model).returncode == 0
    (out / "run.json").unlink()  # as a run stopped after its image, before the tables and run.json
    other = predict(store, *model, "--score-threshold", "0", "--pixel-size", "0.5")
    assert other.returncode == 2 and other.stderr.startswith("error:"), other.stderr[-2000:]
    made = f"pixel_size_um None, score_threshold {OPERATING_POINT}"
    assert f"{made}; this run asks for pixel_size_um 0.5, score_threshold 0.0" in other.stderr
    assert "choose another --out" in other.stderr
    assert not (out / "run.json").exists()
    again = predict(store, *model, "--device", "cpu")  # the same settings (the device may change)
    assert again.returncode == 0 and "1 of 1 images done in an earlier run" in again.stderr
    # an --out made before parts/started.json existed is checked against its run.json
    (out / "parts" / "started.json").unlink()
    flipped = predict(store, *model, "--tta", "flips")
    assert flipped.returncode == 2 and "tta off; this run asks for tta flips" in flipped.stderr


def test_an_unreadable_settings_record_is_replaced(tmp_path):
    """A damaged parts/started.json is rewritten (warned), so the next run has one to check against."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "started.json").write_text("{not json")
    (tmp_path / "parts" / "img-1.json").write_text("{}")  # an image's record: there is something to mix
    model = {"ref": "models:/nuclei@champion", "version": 3}
    check_resumable(tmp_path, model, {"score_threshold": 0.5})
    with pytest.raises(UserError, match="score_threshold 0.5; this run asks for score_threshold 0.25"):
        check_resumable(tmp_path, model, {"score_threshold": 0.25})


def test_settings_that_made_no_image_can_be_corrected(tmp_path):
    """A first run in which every file failed (a wrong --channel, say) left its settings but no image's
    results: a rerun with other settings is not refused, and its settings are the ones checked after."""
    model = {"ref": "models:/nuclei@champion", "version": 3}
    check_resumable(tmp_path, model, {"channel": 5})
    check_resumable(tmp_path, model, {"channel": 0})
    (tmp_path / "parts" / "img-1.json").write_text("{}")  # an image's record, as run_images writes it
    check_resumable(tmp_path, model, {"channel": 0})
    with pytest.raises(UserError, match="channel 0; this run asks for channel 5"):
        check_resumable(tmp_path, model, {"channel": 5})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "models:/nope@champion"], "nope"),
        (["--pixel-size", "-1"], "--pixel-size"),
        (["--page", "-2"], "--page"),
        (["--tta", "rot45"], "--tta: expected one of off, flips, flips+rot90"),
        (["--score-threshold", "1.5"], "--score-threshold: expected a score in [0, 1]"),
    ],
)
def test_user_mistakes_are_one_line(store, images, tmp_path, args, needle):
    argv = ["--model", f"models:/{DETECTOR}@champion", str(images), "--out", str(tmp_path / "o"), *args]
    result = predict(store, *argv)
    assert result.returncode == 2 and needle in result.stderr
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_no_images_and_an_unwritable_out_are_one_line(store, images, tmp_path):
    (tmp_path / "empty").mkdir()
    result = predict(store, "--model", f"models:/{DETECTOR}@champion", str(tmp_path / "empty"), "--out", "o")
    assert result.returncode == 2 and "no files" in result.stderr
    (tmp_path / "file").write_text("x")
    result = predict(
        store, "--model", f"models:/{DETECTOR}@champion", str(images), "--out", str(tmp_path / "file")
    )
    assert result.returncode == 2 and "--out" in result.stderr and "Traceback" not in result.stderr


def test_a_classifier_writes_a_row_per_volume(store, tmp_path):
    write_volumes(tmp_path / "volumes")
    volumes = sorted((tmp_path / "volumes").rglob("*.nii.gz"))
    out = tmp_path / "out"
    result = predict(store, "--model", f"models:/{CLASSIFIER}@champion", str(tmp_path / "volumes"),
                     "--out", str(out), "--top-k", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(volumes) > 0
    for row in rows:
        p1, p2 = float(row["probability_1"]), float(row["probability_2"])
        assert p1 >= p2 and p1 + p2 == pytest.approx(1.0, abs=1e-4)  # two classes: all the mass
        assert row["predicted"] in (row["class_1"], row["class_2"]) and int(row["slices"]) > 0


def test_an_experiment_made_before_the_kind_tag_gets_it(tmp_path):
    from platform._cli import KIND, KIND_TAG, use_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    try:
        assert use_experiment(uri, "old") == old
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")
    assert client.get_experiment(old).tags[KIND_TAG] == KIND


def test_the_predict_benchmark_prints_both_sides_on_both_inputs():
    result = run_cli(
        "platform.bench", "predict", "--recipe", "dsb2018_demo", "--images", "2", "--mosaic", "512"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("folder", "mosaic"))]
    assert len(rows) == 4 and sum("platform.predict" in r for r in rows) == 2
    for row in rows:
        images_per_s, s_per_mp, rss = (float(v) for v in row.split()[-4:-1])
        assert images_per_s > 0 and s_per_mp > 0 and rss > 100  # a process with torch loaded
