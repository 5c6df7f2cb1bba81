"""Post-processing search space, searched on cached predictions of a trained model (no retraining)."""

from search_spaces import register_space

# At most the prediction cache's permissive limit (trainers/detection/thresholds.py PERMISSIVE, 1000): beyond
# it the cache holds no more detections (tests/test_postprocess.py checks the two agree).
DETECTIONS_PER_IMG = (100, 200, 300, 500, 1000)


@register_space(
    "thresholds",
    "per-class score thresholds, NMS IoU, detections per image, minimum mask area (on cached predictions)",
    recipe="dsb2018_demo",
    on_predictions=True,
)
def thresholds(trial, categories) -> dict:
    """One score threshold per category, named `class_score_thresh.i` (i = position in the model's
    categories; not a config field, the search drops such keys) and returned joined as the one
    class_score_thresh field. box_score_thresh is set to the lowest of them: the model then already drops
    what every class threshold would drop (fewer masks to compute, and no low-score detection of one class
    takes a top-k place from another class's), and with one category the two are the same threshold.
    mask_min_area is linear in 0-200 pixels: nuclei of 10-40 px across cover about 80-1250 pixels, so the
    useful range is the low end, which a log scale could not start at 0 (= off) anyway."""
    values = [trial.suggest_float(f"class_score_thresh.{i}", 0.05, 0.95) for i in range(len(categories))]
    trial.suggest_float("box_nms_thresh", 0.3, 0.9)
    trial.suggest_categorical("box_detections_per_img", DETECTIONS_PER_IMG)
    trial.suggest_int("mask_min_area", 0, 200)
    return {"class_score_thresh": ",".join(str(v) for v in values), "box_score_thresh": min(values)}
