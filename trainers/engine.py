"""Train and evaluate steps as plain functions (after torchvision's references/detection/engine.py)."""

import contextlib
import math
import time

import torch
from pycocotools.coco import COCO

from datasets.instances import encode_masks
from trainers.evaluation import coco_report, kaggle_metrics
from trainers.postprocess import filter_output

HEADLINE = ("AP", "AP50", "AP75", "AR100")


def train_one_epoch(
    model,
    optimizer,
    loader,
    device,
    *,
    scheduler=None,
    grad_clip: float = 0.0,
    accumulate_steps: int = 1,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    mask_loss_weight: float = 1.0,
) -> dict[str, float]:
    """One pass over `loader`: one optimizer (and scheduler) step per `accumulate_steps` batches, and one
    for a shorter last group; autocast to `amp_dtype` with an optional GradScaler (fp16). The training loss
    is the sum of the loss terms with `loss_mask` times `mask_loss_weight`. Returns the mean of each loss
    term, `loss`, `images`, `images_per_s` and `optimizer_steps`."""
    model.train()
    sums: dict[str, float] = {}
    batches = images = steps = 0
    start = time.perf_counter()
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)
    for i, (images_batch, targets) in enumerate(loader):
        images_batch = [img.to(device) for img in images_batch]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        last_of_group = (i + 1) % accumulate_steps == 0 or i + 1 == len(loader)
        # Under DDP only the last batch of a group all-reduces its gradients; the others just accumulate.
        sync = contextlib.nullcontext() if last_of_group or not ddp else model.no_sync()
        with sync:
            with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = model(images_batch, targets)
                # Only the optimised sum is weighted: the per-term losses returned below stay unweighted, so
                # runs with different mask_loss_weight compare term by term (`loss` is the weighted sum).
                loss = sum(v * mask_loss_weight if k == "loss_mask" else v for k, v in losses.items())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"loss is {loss.item()} at batch {batches}: {_fmt(losses)}; lower lr or clip"
                )
            # Divided by the group size, N accumulated batches give the mean gradient of one N-fold batch.
            scaled = loss / accumulate_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if last_of_group:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            steps += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        batches += 1
        images += len(images_batch)
    out = {k: v / max(batches, 1) for k, v in sums.items()}
    out["images"] = images
    out["images_per_s"] = images / max(time.perf_counter() - start, 1e-9)
    out["optimizer_steps"] = steps
    return out


def _fmt(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={v.item():.3g}" for k, v in losses.items())


@torch.inference_mode()
def predict(model, loader, device, mask_threshold: float = 0.5, *, cfg=None) -> list[dict]:
    """COCO result entries (bbox xywh, RLE segmentation, score, category) for every image in `loader`;
    with `cfg`, its class_score_thresh and mask_min_area filters applied (the loader's dataset categories
    are the model's)."""
    model.eval()
    categories = getattr(loader.dataset, "categories", None)
    results = []
    for images_batch, targets in loader:
        outputs = model([img.to(device) for img in images_batch])
        for output, target in zip(outputs, targets, strict=True):
            results.extend(
                to_coco_results(output, target["image_id"], mask_threshold, cfg=cfg, categories=categories)
            )
    return results


def to_coco_results(
    output: dict[str, torch.Tensor],
    image_id: int,
    mask_threshold: float = 0.5,
    *,
    cfg=None,
    categories=None,
) -> list[dict]:
    """One torchvision detection output -> COCO result dicts (masks binarised at `mask_threshold`). With a
    MaskRCNNConfig `cfg`, the detections its class_score_thresh (in the order of the model's `categories`)
    and mask_min_area drop are left out first (trainers/postprocess.py filter_output)."""
    if cfg is not None:
        output = filter_output(output, cfg, categories, mask_threshold)
    boxes = output["boxes"].cpu().numpy()
    if not len(boxes):
        return []
    masks = (output["masks"][:, 0] >= mask_threshold).cpu().numpy()
    rles = encode_masks(masks)
    scores, labels = output["scores"].cpu().tolist(), output["labels"].cpu().tolist()
    return [
        {
            "image_id": image_id,
            "category_id": int(label),
            "score": float(score),
            "segmentation": rle,
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
        }
        for (x1, y1, x2, y2), score, label, rle in zip(boxes, scores, labels, rles, strict=True)
    ]


def coco_metrics(gt: COCO, results: list[dict], max_dets: int = 100) -> dict[str, float]:
    """bbox_* and segm_* COCO metrics (AP, AP50, AP75, AR100, per class, ...: trainers/evaluation.py's
    coco_report) for `results` against `gt`, AP and AR at most `max_dets` detections per image."""
    return coco_report(gt, results, max_dets)[0]


def score_results(gt: COCO, results: list[dict], max_dets: int = 100) -> dict[str, float]:
    """COCO metrics and the Kaggle DSB2018/Sartorius metric (kaggle_mAP, matched_mask_IoU, at score 0.5) of
    COCO result dicts from any inference path (whole images, tiles)."""
    return {**coco_metrics(gt, results, max_dets), **kaggle_metrics(gt, results)}
