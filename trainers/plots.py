"""Evaluation and training plots as matplotlib Figures: precision-recall curves from COCOeval, loss curves
from metric histories, prediction overlays, per-image error overlays (TP, FP, FN outlines), and
classification confusion matrices, ROC curves and per-class F1 bars; `log_figure` stores one in the active
MLflow run.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no GUI backend is involved (they render
with Agg when saved) and no global figure registry keeps them alive, so servers and Ray workers can plot.
"""

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from pycocotools.cocoeval import COCOeval
from skimage.segmentation import find_boundaries
from sklearn.metrics import roc_auc_score, roc_curve

from datasets.records import load_image, rle_box_mask
from trainers.classification.metrics import sanitise
from trainers.evaluation import PR_IOUS, coco_stat

OVERLAY_IMAGES = 4  # images drawn with their predictions


def _grid(n: int, cols: int, size: tuple[float, float]) -> tuple[Figure, list]:
    """A figure with `n` axes in rows of at most `cols`; unused grid cells removed."""
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def _mean_defined(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` of the entries > -1 (pycocotools' "undefined"); NaN where none is defined."""
    defined = values > -1
    total = np.where(defined, values, 0.0).sum(axis=axis)
    count = defined.sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def pr_curves(ev: COCOeval, class_names: dict[int, str], title: str = "") -> Figure:
    """Precision against recall from an accumulated COCOeval (all areas, its largest maxDets): one axes for
    all classes together, then one per class, each with a curve per IoU threshold of PR_IOUS and the mean
    over IoU .50:.95; the legend gives each curve's AP."""
    p = ev.params
    max_dets = p.maxDets[-1]
    precision = ev.eval["precision"][:, :, :, p.areaRngLbl.index("all"), -1]  # [T, R, K]
    panels = [("all classes", None)] + [(class_names[c], k) for k, c in enumerate(p.catIds)]
    fig, axes = _grid(len(panels), 3, (4.2, 3.6))
    for ax, (name, k) in zip(axes, panels, strict=True):
        per_class = precision if k is None else precision[:, :, k : k + 1]
        for iou in (None, *PR_IOUS):
            t = slice(None) if iou is None else [int(np.argmin(np.abs(p.iouThrs - iou)))]
            curve = _mean_defined(per_class[t].transpose(1, 0, 2).reshape(len(p.recThrs), -1), axis=1)
            ap = max(coco_stat(ev, "AP", max_dets, iou=iou, cat_index=k), 0.0)
            label = f"IoU .50:.95  AP {ap:.3f}" if iou is None else f"IoU {iou:.2f}  AP {ap:.3f}"
            ax.plot(p.recThrs, curve, label=label, linewidth=2.2 if iou is None else 1.2)
        ax.set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title or f"{p.iouType} precision-recall, max {max_dets} detections")
    return fig


def loss_curves(history: dict[str, list[tuple[int, float]]], title: str = "") -> Figure:
    """Per-epoch curves from MLflow-style metric histories (key -> [(step, value)]): the keys naming a loss
    on one axes, any others (AP, lr, ...) on a second one beside it, each key one line."""
    losses = {k: v for k, v in history.items() if "loss" in k}
    others = {k: v for k, v in history.items() if "loss" not in k}
    panels = [(name, series) for name, series in (("losses", losses), ("metrics", others)) if series]
    fig, axes = _grid(max(len(panels), 1), 2, (6.0, 4.0))
    for ax, (name, series) in zip(axes, panels, strict=False):
        for key, points in sorted(series.items()):
            steps, values = zip(*sorted(points), strict=True) if points else ((), ())
            ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3, label=key)
        ax.set(title=name, xlabel="epoch (step)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.suptitle(title or "training")
    return fig


def learning_curves(curves: dict[str, tuple[list, list, list | None]], metric: str) -> Figure:
    """A search's trials side by side: per trial (name -> epochs, `metric` values, training losses or
    None), the validation metric per epoch on the left and the training loss on the right."""
    fig, (left, right) = _grid(2, 2, (5.5, 4.0))
    for name, (epochs, values, losses) in curves.items():
        left.plot(epochs, values, marker="o", label=name)
        if losses is not None:
            right.plot(epochs, losses, marker="o", label=name)
    left.set(xlabel="epoch", ylabel=metric, title=f"validation {metric} per trial")
    right.set(xlabel="epoch", ylabel="training loss", title="training loss per trial")
    left.legend(fontsize=7)
    return fig


def class_colours(categories) -> dict[int, tuple]:
    """A fixed colour per category id (tab10 in category order)."""
    palette = colormaps["tab10"]
    return {c["id"]: palette(i % 10) for i, c in enumerate(categories)}


def prediction_overlays(
    images: list[np.ndarray],
    predictions: list[list[dict]],
    categories,
    score_threshold: float = 0.3,
    titles: list[str] | None = None,
    alpha: float = 0.45,
) -> Figure:
    """One axes per image (HxWx3 uint8) with its predictions (COCO result dicts: RLE segmentation, bbox
    xywh, score, category_id) scoring at least `score_threshold`: each mask filled in its class colour,
    its box outlined, and "class score" written at the box's top-left corner."""
    colours = class_colours(categories)
    names = {c["id"]: c["name"] for c in categories}
    fig, axes = _grid(len(images), 2, (5.0, 5.0))
    for i, (ax, image, entries) in enumerate(zip(axes, images, predictions, strict=True)):
        ax.imshow(image)
        overlay = np.zeros((*image.shape[:2], 4))
        shown = sorted((e for e in entries if e["score"] >= score_threshold), key=lambda e: e["score"])
        for entry in shown:  # by increasing score, so that the most confident mask ends on top
            colour = colours.get(entry["category_id"], (1.0, 1.0, 1.0, 1.0))
            x, y, mask = rle_box_mask(entry["segmentation"])  # the object's box, not a mosaic-sized mask
            overlay[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = (*colour[:3], alpha)
            x, y, w, h = entry["bbox"]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=0.8))
            ax.text(
                x,
                y,
                f"{names.get(entry['category_id'], entry['category_id'])} {entry['score']:.2f}",
                color="white",
                fontsize=5,
                va="bottom",
                bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0},
            )
        ax.imshow(overlay)
        ax.set_axis_off()
        ax.set_title(
            f"{titles[i] if titles else f'image {i + 1}'}: {len(shown)} >= {score_threshold}", fontsize=8
        )
    return fig


def evaluation_figures(evals: dict, records, results: list[dict], score_threshold: float = 0.5) -> dict:
    """By artifact name: PR curves of each COCOeval in `evals` (iou type -> evaluated COCOeval), and the
    first OVERLAY_IMAGES images of `records` with their predictions (COCO results, image_id = position+1)."""
    categories = records[0].categories
    names = {c["id"]: c["name"] for c in categories}
    out = {f"plots/pr_{iou_type}.png": pr_curves(ev, names) for iou_type, ev in evals.items()}
    shown = records[:OVERLAY_IMAGES]
    out["plots/predictions.png"] = prediction_overlays(
        [load_image(r.image_path) for r in shown],
        [[r for r in results if r["image_id"] == i + 1] for i in range(len(shown))],
        categories,
        score_threshold,
        [r.image_id[:16] for r in shown],
    )
    return out


ERROR_COLOURS = {  # outlines of the per-image error overlays
    "TP": (0.1, 0.85, 0.1),  # predictions matched to an object: green
    "FP": (0.95, 0.1, 0.1),  # predictions matching no object: red
    "FN": (1.0, 0.85, 0.0),  # objects no prediction matched: yellow
}


def outline_layer(shape: tuple[int, int], rles: list[dict], colour: tuple) -> np.ndarray:
    """An HxWx4 layer with the outline of each RLE mask in `colour` (each object's own outline, also where
    two touch), transparent elsewhere."""
    labels = np.zeros(shape, dtype=np.int32)
    for k, rle in enumerate(rles, start=1):
        x, y, mask = rle_box_mask(rle)
        labels[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = k
    layer = np.zeros((*shape, 4))
    layer[find_boundaries(labels, mode="inner")] = (*colour, 1.0)
    return layer


def error_overlays(images: list[np.ndarray], outcomes: list, titles: list[str]) -> Figure:
    """One axes per image (HxWx3 uint8) with the outlines of its outcome (trainers.evaluation.ImageOutcome):
    true-positive predictions green, false positives red, missed objects (false negatives) yellow."""
    fig, axes = _grid(len(images), 3, (5.0, 5.0))
    for ax, image, o, title in zip(axes, images, outcomes, titles, strict=True):
        ax.imshow(image)
        groups = {
            "TP": [o.predicted[i] for i, _ in o.pairs],
            "FP": [o.predicted[i] for i in o.false_positives],
            "FN": [o.truth[j] for j in o.false_negatives],
        }
        for kind, rles in groups.items():
            ax.imshow(outline_layer(image.shape[:2], rles, ERROR_COLOURS[kind]), interpolation="nearest")
        counts = ", ".join(f"{kind} {len(rles)}" for kind, rles in groups.items())
        ax.set_title(f"{title}\n{counts}", fontsize=8)
        ax.set_axis_off()
    handles = [Patch(color=c, label=k) for k, c in ERROR_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    return fig


def log_figure(fig: Figure, artifact_file: str, dpi: int = 120) -> None:
    """Save `fig` as a PNG artifact (e.g. "plots/pr_segm.png") of the active MLflow run."""
    import mlflow

    mlflow.log_figure(fig, artifact_file, save_kwargs={"dpi": dpi})


def confusion_matrix_figure(cm: np.ndarray, classes, title: str = "") -> Figure:
    """A C x C confusion matrix (rows = true class, columns = predicted): each cell coloured by its share
    of the true class's samples, so that rare classes read as clearly as common ones, and annotated with
    its count."""
    cm = np.asarray(cm)
    n = len(classes)
    totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
    side = max(4.0, 0.55 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of the true class", shrink=0.8)
    fontsize = max(4, min(9, 120 // max(n, 1)))
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if shares[i, j] > 0.5 else "black"  # legible on both ends of the colour map
        ax.text(j, i, str(int(count)), ha="center", va="center", color=colour, fontsize=fontsize)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=45, ha="right", fontsize=fontsize)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title or "confusion matrix")
    return fig


def roc_figure(probs: np.ndarray, labels: np.ndarray, classes, title: str = "") -> Figure:
    """One-vs-rest ROC curves, one line per class with its AUC in the legend (binary: the positive class,
    classes[1], only), plus the dashed chance diagonal. A class whose labels hold only positives or only
    negatives has no ROC curve and is left out."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    fig = Figure(figsize=(5.5, 5.0), layout="constrained")
    ax = fig.subplots()
    shown = [1] if len(classes) == 2 else range(len(classes))
    for k in shown:
        positive = labels == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        ax.plot(
            fpr, tpr, linewidth=1.4, label=f"{classes[k]}  AUC {roc_auc_score(positive, probs[:, k]):.3f}"
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "ROC (one vs rest)")
    return fig


def f1_bars_figure(metrics: dict, classes, title: str = "") -> Figure:
    """Per-class F1 as bars, slice level and volume level side by side (`slice_f1_<name>`,
    `volume_f1_<name>` of a classification report; a missing key draws as an empty bar)."""
    names = [sanitise(c) for c in classes]
    x = np.arange(len(classes))
    width = 0.4
    fig = Figure(figsize=(max(5.0, 0.6 * len(classes) + 2.0), 4.0), layout="constrained")
    ax = fig.subplots()
    for offset, level in ((-width / 2, "slice"), (width / 2, "volume")):
        values = [metrics.get(f"{level}_f1_{name}", np.nan) for name in names]
        mean = metrics.get(f"{level}_f1", np.nan)
        ax.bar(x + offset, values, width, label=f"{level}  (macro F1 {mean:.3f})")
    ax.set_xticks(x, [str(c) for c in classes], rotation=45 if len(classes) > 6 else 0, ha="right")
    ax.set(ylabel="F1", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    ax.set_title(title or "F1 per class")
    return fig


def classification_figures(details: dict, metrics: dict, classes) -> dict[str, Figure]:
    """By artifact name: the slice- and volume-level confusion matrices and ROC curves and the per-class F1
    bars of a `trainers.classification.metrics.report` (its details and metrics)."""
    out = {}
    for level in ("slice", "volume"):
        d = details[level]
        out[f"plots/confusion_{level}.png"] = confusion_matrix_figure(
            d["confusion"], classes, f"{level} confusion matrix ({len(d['labels'])} {level}s)"
        )
        out[f"plots/roc_{level}.png"] = roc_figure(d["probs"], d["labels"], classes, f"{level} ROC")
    out["plots/f1_per_class.png"] = f1_bars_figure(metrics, classes)
    return out


def label_overlay(image: np.ndarray, labels: np.ndarray, colours: list[tuple], numbers: bool) -> np.ndarray:
    """HxWx3 uint8 `image` with each object of `labels` outlined in its colour (`colours[k - 1]` for label
    k, RGB in [0, 1]), and its label number written at its centre when `numbers`, at full resolution."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    out = image.copy()
    edges = find_boundaries(labels, mode="inner")
    palette = np.zeros((len(colours) + 1, 3), dtype=np.uint8)
    palette[1:] = (np.asarray(colours, dtype=np.float64).reshape(-1, 3) * 255).round()
    out[edges] = palette[labels[edges]]
    if not numbers or not colours:
        return out
    picture = Image.fromarray(out)
    draw = ImageDraw.Draw(picture)
    centres = ndimage.center_of_mass(labels > 0, labels, range(1, len(colours) + 1))
    for k, (y, x) in enumerate(centres, start=1):
        if np.isfinite(x):  # an object the overlaps left without pixels has no centre
            draw.text((x, y), str(k), fill=(255, 255, 255), anchor="mm")
    return np.asarray(picture)


def batch_summary(counts: dict[str, int], diameters: list[float], unit: str, title: str = "") -> Figure:
    """Objects per class (bars) and the distribution of their equivalent diameters (in `unit`)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    bars, sizes = fig.subplots(1, 2)
    bars.bar(
        list(counts), list(counts.values()), color=[colormaps["tab10"](i % 10) for i in range(len(counts))]
    )
    bars.set_ylabel("objects")
    bars.set_title("objects per class")
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    if diameters:
        sizes.hist(diameters, bins=min(50, max(5, len(diameters) // 10)), color="tab:orange")
    sizes.set_xlabel(f"equivalent diameter ({unit})")
    sizes.set_ylabel("objects")
    sizes.set_title(f"size distribution ({len(diameters)} objects)")
    if title:
        fig.suptitle(title)
    return fig
