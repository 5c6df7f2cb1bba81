import json
import pickle
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.errors import UserError
from datasets.instances import quiet_pycocotools, read_records
from datasets.records import load_image, rle_to_json, write_bytes_atomic
from datasets.splits import train_val_split
from search_spaces import get_space, sample
from search_spaces.thresholds import DETECTIONS_PER_IMG
from tests.helpers import RunsCode, sample_subset
from trainers.config import MaskRCNNConfig, apply_overrides, to_dict
from trainers.detection import postprocess
from trainers.detection.inference import to_coco_results
from trainers.detection.model import build_model
from trainers.detection.postprocess import filter_output
from trainers.detection.thresholds import (
    PERMISSIVE,
    PredictionCache,
    apply_postprocess,
    cache_predictions,
    evaluate_thresholds,
    load_cache,
    save_cache,
    score_postprocessed,
)
from trainers.detection.train import save_checkpoint
from trainers.evaluation import kaggle_metrics
from trainers.recipes import get_recipe

TWO = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "debris"}]


# ---- a real (random) model: the cache reproduces running the model with the same settings ---------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init two-class ResNet-18-FPN checkpoint of a 4-image sample dataset, 2 for validation.
    Its class scores spread over about 0.1-0.7 (0.2-0.3 median), so thresholds of 0.15-0.25 keep some
    detections, not all; 30 proposals keep the mask head cheap on CPU."""
    root = tmp_path_factory.mktemp("pp")
    data = root / "data"
    sample_subset(data, 4)
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"),
        {"data": str(data), "val_fraction": 0.5, "seed": 3, "rpn_post_nms_top_n_test": 30},
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(TWO))
    # A spread of class scores (random init gives logits near 0): not all detections tie around 1/3.
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    folder = root / "checkpoint"
    folder.mkdir()
    save_checkpoint(folder, cfg, model, TWO, {})
    cache = cache_predictions(folder, root / "cache" / "val.npz", device="cpu")
    return folder, cfg, model.eval(), load_cache(cache)


@pytest.mark.parametrize("mask_refine", ["off", "otsu"])
def test_tiled_cache_and_filters(checkpoint, tmp_path, mask_refine):
    """Full-resolution mode: the cache holds the stitched detections of tiled inference, and the filters
    apply to them as predict_records applies them at inference, and so does the mask refinement. 256-px
    tiles: the 256 x 320 validation image is two tiles (stitched), the 256 x 256 one a single tile."""
    from trainers.detection.inference import predict_records

    folder, cfg, model, _ = checkpoint
    tiled = apply_overrides(cfg, {"tile_size": 256, "tile_overlap": 32, "mask_refine": mask_refine})
    copy = tmp_path / "tiled"
    shutil.copytree(folder, copy)
    save_checkpoint(copy, tiled, model, TWO, {})  # same weights, tiled config
    cache = load_cache(cache_predictions(copy, tmp_path / "tiled.npz", device="cpu"))
    assert cache.tiled and cache.images == 2 and len(cache.scores) > 0
    for i in range(cache.images):  # per image, by score, as apply_postprocess expects
        assert (np.diff(cache.scores[cache.offsets[i] : cache.offsets[i + 1]]) <= 0).all()
    params = {"class_score_thresh": (0.2, 0.25), "mask_min_area": int(np.median(cache.areas))}
    ours = apply_postprocess(cache, {**PERMISSIVE, **params})
    tiled_model = build_model(tiled, num_classes=len(TWO))
    tiled_model.load_state_dict(model.state_dict())
    tiled_model.roi_heads.score_thresh = PERMISSIVE["box_score_thresh"]
    tiled_model.roi_heads.nms_thresh = PERMISSIVE["box_nms_thresh"]
    tiled_model.roi_heads.detections_per_img = PERMISSIVE["box_detections_per_img"]
    _, val = train_val_split(read_records(cfg.data), cfg.val_fraction, cfg.seed, cfg.split_file)
    direct = predict_records(
        tiled_model,
        val,
        "cpu",
        tile_size=256,
        tile_overlap=32,
        cfg=apply_overrides(tiled, params),
        categories=TWO,
    )
    key = lambda r: (r["image_id"], -r["score"])  # noqa: E731
    assert 0 < len(ours) < len(cache.scores)
    assert [(r["image_id"], r["segmentation"]) for r in sorted(ours, key=key)] == [
        (r["image_id"], r["segmentation"]) for r in sorted(direct, key=key)
    ]


def test_cache_holds_the_training_validation_split(checkpoint):
    _, cfg, _, cache = checkpoint
    _, val = train_val_split(read_records(cfg.data), cfg.val_fraction, cfg.seed, cfg.split_file)
    assert cache.image_files == [str(r.image_path) for r in val] and cache.images == 2
    assert [img["id"] for img in cache.ground_truth["images"]] == [1, 2]
    assert cache.ground_truth["annotations"]  # nuclei to score against
    assert cache.categories == TWO and cache.config == to_dict(cfg) and cache.permissive == PERMISSIVE
    assert len(cache.scores) == len(cache.rles) == len(cache.labels) == cache.offsets[-1]
    assert set(cache.labels.tolist()) == {1, 2}
    areas = [int(mask_utils.area(r)) for r in cache.rles]
    assert cache.areas.tolist() == areas


@pytest.mark.parametrize(
    "settings",
    [
        {"box_score_thresh": 0.2, "box_nms_thresh": 0.5, "box_detections_per_img": 20},
        {"box_score_thresh": 0.25, "box_nms_thresh": 0.3, "box_detections_per_img": 7},
    ],
)
def test_cache_equals_running_the_model(checkpoint, settings):
    _, cfg, model, cache = checkpoint
    model.roi_heads.score_thresh = settings["box_score_thresh"]
    model.roi_heads.nms_thresh = settings["box_nms_thresh"]
    model.roi_heads.detections_per_img = settings["box_detections_per_img"]
    ours = apply_postprocess(cache, settings)
    with torch.inference_mode():
        for index, path in enumerate(cache.image_files):
            image = torch.from_numpy(load_image(path)).permute(2, 0, 1).float().div(255)
            direct = to_coco_results(model([image])[0], index + 1)
            mine = [r for r in ours if r["image_id"] == index + 1]
            cached = cache.offsets[index + 1] - cache.offsets[index]
            assert 0 < len(direct) < cached  # the settings select: a real test of the selection
            assert len(mine) == len(direct)
            for a, b in zip(mine, direct, strict=True):
                assert a["category_id"] == b["category_id"]
                assert a["score"] == pytest.approx(b["score"], abs=1e-5)
                assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-5)
                assert a["segmentation"] == b["segmentation"]  # the same mask, pixel for pixel


def test_filters_at_inference_match_the_cache(checkpoint):
    _, cfg, model, cache = checkpoint
    params = {
        "box_score_thresh": 0.15,
        "box_nms_thresh": 0.5,
        "box_detections_per_img": 50,
        "class_score_thresh": (0.2, 0.25),
        "mask_min_area": int(np.median(cache.areas)),
    }
    filtered = apply_overrides(cfg, params)
    model.roi_heads.score_thresh, model.roi_heads.nms_thresh = 0.15, 0.5
    model.roi_heads.detections_per_img = 50
    ours = apply_postprocess(cache, params)
    direct = []
    with torch.inference_mode():
        for index, path in enumerate(cache.image_files):
            image = torch.from_numpy(load_image(path)).permute(2, 0, 1).float().div(255)
            output = model([image])[0]
            unfiltered = to_coco_results(output, index + 1)
            direct += to_coco_results(output, index + 1, cfg=filtered, categories=TWO)
            assert len(to_coco_results(output, index + 1, cfg=cfg, categories=TWO)) == len(unfiltered)
    assert 0 < len(direct) < len(apply_postprocess(cache, {**params, "class_score_thresh": ()}))
    assert [(r["image_id"], r["score"], r["segmentation"]) for r in ours] == [
        (r["image_id"], pytest.approx(r["score"], abs=1e-5), r["segmentation"]) for r in direct
    ]


# ---- a synthetic cache: the selection against a brute-force reference ----------------------------------


def _box_rle(box, height, width) -> dict:
    x1, y1, x2, y2 = box
    return rle_to_json(
        mask_utils.frPyObjects(np.array([[x1, y1, x2 - x1, y2 - y1]], float), height, width)[0]
    )


def synthetic_cache(images=4, objects=6, seed=0, size=128) -> PredictionCache:
    """Per image `objects` square nuclei; detections: each nucleus found as a high-scoring jittered box
    (mostly), near-duplicates of it (some of the other class) and low-scoring false positives; the masks
    are the boxes filled. Integer coordinates, sorted by score within an image, as the model outputs."""
    rng = np.random.default_rng(seed)
    gt_images, annotations = [], []
    labels, scores, boxes, offsets = [], [], [], [0]
    for i in range(images):
        gt_images.append({"id": i + 1, "height": size, "width": size})
        dets = []
        for _ in range(objects):
            x, y = rng.integers(0, size - 24, 2)
            s = int(rng.integers(6, 22))
            truth = [int(x), int(y), int(x + s), int(y + s)]
            rle = _box_rle(truth, size, size)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            for k in range(int(rng.integers(1, 5))):
                jitter = rng.integers(-2, 3, 4)
                box = np.clip(np.array(truth) + jitter, 0, size).tolist()
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
                score = rng.uniform(0.6, 1.0) if k == 0 else rng.uniform(0.2, 0.8)
                dets.append((box, int(rng.choice([1, 2], p=[0.8, 0.2])), score))
        for _ in range(objects):
            x, y = rng.integers(0, size - 10, 2)
            s = int(rng.integers(2, 10))
            dets.append(
                ([int(x), int(y), int(x + s), int(y + s)], int(rng.integers(1, 3)), rng.uniform(0, 0.5))
            )
        dets.sort(key=lambda d: -d[2])
        for box, label, score in dets:
            boxes.append(box)
            labels.append(label)
            scores.append(score)
        offsets.append(len(boxes))
    boxes = np.array(boxes, dtype=np.float32)
    rles = [_box_rle(b, size, size) for b in boxes.tolist()]
    return PredictionCache(
        config=to_dict(MaskRCNNConfig()),
        categories=TWO,
        ground_truth={
            "images": gt_images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "debris"}],
        },
        image_files=[f"{i}.png" for i in range(images)],
        permissive=dict(PERMISSIVE),
        tiled=False,
        mask_threshold=0.5,
        offsets=np.array(offsets, dtype=np.int64),
        complete_above=np.full(images, PERMISSIVE["box_score_thresh"]),
        labels=np.array(labels, dtype=np.int64),
        scores=np.array(scores, dtype=np.float32),
        nms_boxes=boxes,
        bboxes=np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64),
        areas=np.array([mask_utils.area(r) for r in rles], dtype=np.int64),
        rles=rles,
    )


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def brute_force(cache: PredictionCache, p: dict) -> list[tuple[int, int]]:
    """(image id, cache row) of the kept detections, by plain loops: score > t, greedy NMS per class from
    the highest score, the first k by score, then class thresholds (>=) and mask area (>=)."""
    kept = []
    for i in range(cache.images):
        rows = [
            r
            for r in range(cache.offsets[i], cache.offsets[i + 1])
            if cache.scores[r] > p["box_score_thresh"]
        ]
        rows.sort(key=lambda r: -cache.scores[r])
        survivors = []
        for r in rows:
            box = cache.nms_boxes[r].tolist()
            if all(
                cache.labels[s] != cache.labels[r]
                or _iou(cache.nms_boxes[s].tolist(), box) <= p["box_nms_thresh"]
                for s in survivors
            ):
                survivors.append(r)
        for r in survivors[: p["box_detections_per_img"]]:
            thresholds = p.get("class_score_thresh") or ()
            if thresholds and cache.scores[r] < thresholds[int(cache.labels[r]) - 1]:
                continue
            if cache.areas[r] < p.get("mask_min_area", 0):
                continue
            kept.append((i + 1, r))
    return kept


def _rows(cache, results) -> list[tuple[int, int]]:
    row_of = {id(rle): row for row, rle in enumerate(cache.rles)}
    return [(r["image_id"], row_of[id(r["segmentation"])]) for r in results]


@pytest.mark.parametrize(
    "params",
    [
        {"box_score_thresh": 0.1, "box_nms_thresh": 0.5, "box_detections_per_img": 100},
        {"box_score_thresh": 0.3, "box_nms_thresh": 0.3, "box_detections_per_img": 4},
        {"box_score_thresh": 0.01, "box_nms_thresh": 0.7, "box_detections_per_img": 8, "mask_min_area": 60},
        {
            "box_score_thresh": 0.05,
            "box_nms_thresh": 0.5,
            "box_detections_per_img": 100,
            "class_score_thresh": (0.5, 0.3),
            "mask_min_area": 30,
        },
        {
            "box_score_thresh": 0.2,
            "box_nms_thresh": 0.6,
            "box_detections_per_img": 10,
            "class_score_thresh": (0.7, 0.1),
        },
    ],
)
def test_selection_equals_brute_force(params):
    cache = synthetic_cache()
    results = apply_postprocess(cache, params)
    expected = brute_force(cache, {"mask_min_area": 0, **params})
    assert _rows(cache, results) == expected
    assert 0 < len(expected) < len(cache.scores)
    for r, (_, row) in zip(results, expected, strict=True):
        assert r["category_id"] == cache.labels[row] and r["score"] == float(cache.scores[row])
        assert r["bbox"] == cache.bboxes[row].tolist()


def test_new_filters_select_what_they_say():
    cache = synthetic_cache()
    base = {"box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100}
    everything = apply_postprocess(cache, base)
    by_class = apply_postprocess(cache, {**base, "class_score_thresh": "0.6,0.3"})
    assert by_class == [r for r in everything if r["score"] >= (0.6, 0.3)[r["category_id"] - 1]]
    large = apply_postprocess(cache, {**base, "mask_min_area": 100})
    assert large == [r for r in everything if mask_utils.area(r["segmentation"]) >= 100]
    assert 0 < len(by_class) < len(everything) and 0 < len(large) < len(everything)
    # missing params take the model config's values (MaskRCNNConfig defaults here)
    defaults = MaskRCNNConfig()
    assert apply_postprocess(cache, {}) == apply_postprocess(
        cache, {k: getattr(defaults, k) for k in postprocess.POSTPROCESS_FIELDS}
    )


def test_wrong_class_thresholds_are_a_user_error():
    cache = synthetic_cache(images=1)
    with pytest.raises(UserError, match=r"class_score_thresh.*nucleus, debris"):
        apply_postprocess(cache, {"class_score_thresh": (0.5,)})
    output = {
        "boxes": torch.zeros((1, 4)),
        "labels": torch.ones(1, dtype=torch.int64),
        "scores": torch.ones(1),
        "masks": torch.ones((1, 1, 4, 4)),
    }
    cfg = MaskRCNNConfig(class_score_thresh=(0.1, 0.2, 0.3))
    with pytest.raises(UserError, match="class_score_thresh"):
        filter_output(output, cfg, TWO)
    with pytest.raises(UserError, match="class_score_thresh"):
        postprocess.filter_results([{"category_id": 1, "score": 0.5}], cfg, TWO)
    with pytest.raises(UserError, match="lr"):
        apply_postprocess(cache, {"lr": 0.1})


def test_filter_output_on_a_model_output():
    masks = torch.zeros((3, 1, 10, 10))
    masks[0, 0, :5] = 0.9  # 50 pixels
    masks[1, 0, :2] = 0.6  # 20 pixels
    masks[2, 0] = 0.4  # nothing at 0.5
    output = {
        "boxes": torch.rand((3, 4)),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.9, 0.4, 0.6]),
        "masks": masks,
    }
    assert filter_output(output, MaskRCNNConfig(), TWO) is output  # defaults: nothing changes
    kept = filter_output(output, MaskRCNNConfig(class_score_thresh=(0.7, 0.3)), TWO)
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.4])
    kept = filter_output(output, MaskRCNNConfig(mask_min_area=20), TWO)
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.4])
    kept = filter_output(output, MaskRCNNConfig(mask_min_area=21, class_score_thresh=(0.5, 0.5)), TWO)
    assert kept["scores"].tolist() == pytest.approx([0.9])
    assert set(kept) == set(output) and kept["masks"].shape == (1, 1, 10, 10)


def test_registry_predict_applies_the_filters():
    from deploy.registry import predict_image

    class Fixed(torch.nn.Module):
        def forward(self, images):
            masks = torch.zeros((2, 1, *images[0].shape[1:]))
            masks[0, 0, :4, :4] = 1.0
            masks[1, 0, :8, :8] = 1.0
            return [
                {
                    "boxes": torch.tensor([[0.0, 0, 4, 4], [0, 0, 8, 8]]),
                    "labels": torch.tensor([1, 2]),
                    "scores": torch.tensor([0.9, 0.8]),
                    "masks": masks,
                }
            ]

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    detector = SimpleNamespace(model=Fixed(), categories=TWO, device="cpu", config=MaskRCNNConfig())
    assert len(predict_image(detector, image)["scores"]) == 2
    detector.config = MaskRCNNConfig(mask_min_area=20)
    assert predict_image(detector, image)["class_names"] == ["debris"]
    detector.config = MaskRCNNConfig(class_score_thresh=(0.5, 0.85))
    assert predict_image(detector, image)["class_names"] == ["nucleus"]


# ---- scoring ---------------------------------------------------------------------------------------------


def _pycocotools_segm_ap(ground_truth: dict, results: list[dict]) -> float:
    gt = COCO()
    gt.dataset = ground_truth
    with quiet_pycocotools():
        gt.createIndex()
        ev = COCOeval(
            gt, gt.loadRes([dict(r, segmentation=dict(r["segmentation"])) for r in results]), "segm"
        )
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0)


def test_scores_agree_with_the_reference_and_follow_the_thresholds():
    cache = synthetic_cache()
    low = {"box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100}
    high = {**low, "class_score_thresh": (0.6, 0.6)}
    scores = {}
    for name, params in (("low", low), ("high", high)):
        results = apply_postprocess(cache, params)
        metrics = evaluate_thresholds(cache, params)
        assert metrics == score_postprocessed(cache, results)
        assert metrics["detections"] == len(results)
        # pycocotools' own COCOeval (at most 100 detections per image, as these results have)
        assert metrics["segm_AP"] == pytest.approx(
            _pycocotools_segm_ap(cache.ground_truth, results), abs=1e-9
        )
        gt = COCO()
        gt.dataset = cache.ground_truth
        with quiet_pycocotools():
            gt.createIndex()
        assert metrics["kaggle_mAP"] == kaggle_metrics(gt, results, score_threshold=0.0)["kaggle_mAP"]
        scores[name] = metrics
    # Low-scoring false positives cost the Kaggle metric (every result counts there); the high
    # thresholds drop them.
    assert scores["high"]["kaggle_mAP"] > scores["low"]["kaggle_mAP"]
    assert scores["high"]["detections"] < scores["low"]["detections"]


def test_cache_file_round_trip_and_errors(tmp_path):
    cache = synthetic_cache(images=2)
    path = save_cache(cache, tmp_path / "c.npz")
    loaded = load_cache(path)
    for f in PredictionCache.__dataclass_fields__:  # the same contents, arrays with their dtypes
        ours, theirs = getattr(loaded, f), getattr(cache, f)
        if isinstance(theirs, np.ndarray):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), f
        else:
            assert ours == theirs, f
    params = {"box_score_thresh": 0.2, "box_nms_thresh": 0.5}
    assert apply_postprocess(loaded, params) == apply_postprocess(cache, params)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left behind
    path.write_bytes(b"not a cache")
    with pytest.raises(UserError, match="c.npz: not a prediction cache"):
        load_cache(path)
    with pytest.raises(UserError, match="not found"):
        load_cache(tmp_path / "missing.npz")


def test_an_old_pickle_cache_is_refused_without_being_unpickled(tmp_path):
    """Version 1 caches were pickles, and a pickle can run code: load_cache reads with allow_pickle=False."""
    marker = tmp_path / "unpickled"
    old = tmp_path / "predictions.pkl"
    write_bytes_atomic(old, pickle.dumps(RunsCode(marker)))
    with pytest.raises(UserError, match=r"predictions.pkl: not a prediction cache \(\.npz; remake"):
        load_cache(old)
    assert not marker.exists()
    pickle.loads(old.read_bytes())  # the control: unpickling it would have run the code
    assert marker.exists()


def test_a_cache_of_another_version_or_dtype_is_refused(tmp_path):
    cache = synthetic_cache(images=1)
    path = save_cache(cache, tmp_path / "c.npz")
    with np.load(path) as npz:
        members = dict(npz)
    meta = json.loads(members["json"].tobytes())
    for change, message in (
        ({"json": {**meta, "version": 1}}, "prediction cache version 1, expected 2"),
        ({"labels": members["labels"].astype(np.float32)}, "labels has dtype float32"),
        ({"json": {k: v for k, v in meta.items() if k != "rles"}}, "lacks rles"),
    ):
        changed = {**members, **change}
        if isinstance(changed["json"], dict):
            changed["json"] = np.frombuffer(json.dumps(changed["json"]).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **changed)
        with pytest.raises(UserError, match=message):
            load_cache(path)


# ---- the search space ---------------------------------------------------------------------------------


def test_thresholds_space_samples_post_processing_configs():
    space = get_space("thresholds")
    assert space.on_predictions and max(DETECTIONS_PER_IMG) <= PERMISSIVE["box_detections_per_img"]
    base = get_recipe("dsb2018_demo")
    cache = synthetic_cache(images=2)
    for seed in range(5):
        values = sample(space, seed, categories=("nucleus", "debris"))
        assert {k for k in values if "." in k} == {"class_score_thresh.0", "class_score_thresh.1"}
        fields = {k: v for k, v in values.items() if "." not in k}
        assert set(fields) <= set(postprocess.POSTPROCESS_FIELDS)
        cfg = apply_overrides(base, fields)
        assert cfg.class_score_thresh == (values["class_score_thresh.0"], values["class_score_thresh.1"])
        assert cfg.box_score_thresh == min(cfg.class_score_thresh)
        evaluate_thresholds(cache, fields)  # every sample is a valid trial


def test_one_trial_timing():
    """Not an assertion: how long one trial takes on ~30 images x ~900 cached detections (250 nuclei per
    image: dense, Sartorius-like). Scoring is the COCO and Kaggle evaluation of the kept detections."""
    cache = synthetic_cache(images=30, objects=250, seed=1, size=512)
    per_image = np.diff(cache.offsets).mean()
    params = {"box_score_thresh": 0.3, "box_nms_thresh": 0.5, "box_detections_per_img": 200}
    cache.coco  # noqa: B018  (the ground truth index, built once per cache, not per trial)
    started = time.perf_counter()
    results = apply_postprocess(cache, params)
    applied = time.perf_counter() - started
    started = time.perf_counter()
    score_postprocessed(cache, results)
    scored = time.perf_counter() - started
    print(
        f"\none trial on {cache.images} images x {per_image:.0f} cached detections: apply_postprocess "
        f"{applied:.3f} s, scoring {scored:.3f} s ({len(results)} results)"
    )
