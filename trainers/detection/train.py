"""Mask R-CNN training on every Ray Train worker: the optimizer, its schedule, one epoch of steps (after
torchvision's references/detection/engine.py), validation, and the task's part of the one training
skeleton (trainers/run.py)."""

import contextlib
import copy
import logging
import math
import time
from dataclasses import replace
from functools import partial

import torch
from torch.utils.data import DataLoader

from datasets.augment import augmentation
from datasets.errors import UserError
from datasets.instances import (
    SAMPLE_DATA,
    InstanceDataset,
    TiledInstanceDataset,
    coco_ground_truth,
    collate,
    read_records,
)
from datasets.splits import train_val_split
from trainers.checkpoints import read_state_dict, read_tensors
from trainers.config import MaskRCNNConfig, from_dict
from trainers.detection.combine import with_tta
from trainers.detection.inference import predict, predict_records
from trainers.detection.model import build_model, save_checkpoint
from trainers.evaluation import best_cutoff, kaggle_by_cutoff, score_results
from trainers.ray_seam import RaySeam
from trainers.run import (
    BestEpoch,
    WeightAverage,
    autocast_dtype,
    grad_scaler,
    run_epochs,
    seed_everything,
    train_loader,
    validated_model,
    weight_average,
)
from trainers.schedules import lr_factor, max_trainable_layers, phase_at, set_trainable_layers

log = logging.getLogger(__name__)


def scaled_lr(cfg: MaskRCNNConfig, world_size: int = 1) -> float:
    """`cfg.lr`, or with lr_reference_batch > 0 the linear scaling rule (Goyal et al. 2017): the lr grows in
    proportion to the images per optimizer step, so recipes keep their meaning on more workers."""
    if cfg.lr_reference_batch <= 0:
        return cfg.lr
    global_batch = cfg.batch_size * world_size * cfg.accumulate_steps
    return cfg.lr * global_batch / cfg.lr_reference_batch


def build_optimizer(
    cfg: MaskRCNNConfig, model: torch.nn.Module, world_size: int = 1
) -> torch.optim.Optimizer:
    """Over the parameters that require grad now (run_training first unfreezes every phase's union)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(cfg, world_size)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: MaskRCNNConfig, optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; the factor is trainers/schedules.py's lr_factor."""
    factor = partial(lr_factor, cfg, steps_per_epoch=steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps_per_epoch(batches: int, accumulate_steps: int) -> int:
    # A short last group still steps (train_one_epoch).
    return math.ceil(batches / accumulate_steps)


def config_split(cfg: MaskRCNNConfig) -> tuple[list, list]:
    """(train, val) image records of `cfg`: its data (or the bundled sample) split as training splits it."""
    records = read_records(cfg.data or SAMPLE_DATA, cfg.data_format)
    return train_val_split(records, cfg.val_fraction, cfg.seed, cfg.split_file)


def train_set_of(cfg: MaskRCNNConfig, records: list, rank: int):
    """The training dataset: whole images, or in full-resolution mode every tile of every image, augmented
    by the config's preset with a stream per rank."""
    transform = augmentation(
        cfg.augment,
        cfg.seed + rank,
        rotate=cfg.aug_rotate,
        scale=cfg.aug_scale,
        brightness=cfg.aug_brightness,
        contrast=cfg.aug_contrast,
        blur=cfg.aug_blur,
    )
    if not cfg.tile_size:
        return InstanceDataset(records, transform, cfg.normalize)
    tiles = TiledInstanceDataset(
        records, cfg.tile_size, cfg.tile_overlap, cfg.tile_min_visible, transform, cfg.normalize
    )
    log.info("full-resolution mode: %d tiles of %d px per epoch", len(tiles), cfg.tile_size)
    return tiles


def run_training(cfg: MaskRCNNConfig, seam) -> None:
    """Train `cfg.epochs` epochs (trainers/run.py); each epoch rank 0 evaluates and checkpoints."""
    train_records, val_records = config_split(cfg)
    train_set = train_set_of(cfg, train_records, seam.rank)
    generator = torch.Generator()
    loader = train_loader(seam, train_set, cfg.batch_size, cfg.loader_workers, generator, collate_fn=collate)
    bare = training_model(cfg, seam, len(train_set.categories))
    optimizer, scheduler = optimisation(cfg, bare, seam.world_size, len(loader))
    amp_dtype, scaler = autocast_dtype(cfg, seam.device), grad_scaler(cfg)
    best = BestEpoch(higher_is_better=True)  # on validation segm_AP, the metric searches maximise
    average = weight_average(cfg.ema_decay, bare)
    start_epoch, resumed = _resume(cfg, seam, bare, optimizer, scheduler, scaler, best, average)
    best_cut = resumed.get("best_score_threshold", cfg.score_threshold)  # the best epoch's operating point
    if seam.rank == 0:
        val_loader, ground_truth = validation_of(cfg, val_records)

    def set_phase(layers: int) -> None:
        set_trainable_layers(bare, layers)
        log.info("%d backbone stages trainable", layers)

    def train_epoch(model, epoch: int) -> dict:
        stats = train_one_epoch(
            model,
            optimizer,
            loader,
            seam.device,
            scheduler=scheduler,
            grad_clip=cfg.grad_clip,
            accumulate_steps=cfg.accumulate_steps,
            amp_dtype=amp_dtype,
            scaler=scaler,
            mask_loss_weight=cfg.mask_loss_weight,
            average=average,
        )
        metrics = {f"train_{k}": v for k, v in stats.items()}
        return {**metrics, "lr": optimizer.param_groups[0]["lr"], "torch_threads": torch.get_num_threads()}

    def end_epoch(epoch: int, metrics: dict):
        nonlocal best_cut
        evaluated = validated_model(average, bare)  # the weights the run hands over
        metrics.update(validate(cfg, evaluated, val_loader, seam.device, ground_truth))
        if best.update(metrics["segm_AP"], epoch + 1, evaluated, keep_weights=cfg.restore_best):
            best_cut = metrics["score_threshold"]
        stop = best.stop(cfg.early_stop_patience)
        metrics.update(best_segm_AP=best.value, best_epoch=best.epoch, early_stopped=float(stop))
        # model.pt: the best epoch so far, or the latest; config.json: the operating point of those weights
        weights = best.weights if cfg.restore_best else evaluated.state_dict()
        if (stop or epoch + 1 == cfg.epochs) and cfg.choose_score_threshold and cfg.tta != "off":
            # validation runs without TTA; the model is used with it, whose averaged scores sit lower
            cut = cutoff_with_tta(cfg, bare, weights, val_records, seam.device, ground_truth)
            best_cut = metrics["score_threshold"] = cut
        elif not cfg.restore_best:
            best_cut = metrics["score_threshold"]
        state = {
            **training_state(bare, optimizer, scheduler, scaler, epoch + 1),
            **best.state(),
            **(average.state() if average else {}),
            "best_score_threshold": best_cut,
        }
        handed_over = replace(cfg, score_threshold=best_cut)
        categories = train_set.categories
        write = partial(
            save_checkpoint, cfg=handed_over, model=weights, categories=categories, train_state=state
        )
        return write, stop

    run_epochs(
        seam,
        cfg,
        start_epoch,
        bare,
        loader,
        generator,
        train_set.transform,
        phase_of=lambda epoch: phase_at(cfg, epoch)[0],
        set_phase=set_phase,
        train_epoch=train_epoch,
        end_epoch=end_epoch,
    )


def training_model(cfg: MaskRCNNConfig, seam, num_classes: int) -> torch.nn.Module:
    """The model a run starts from, the same initial weights on every rank, on the seam's device."""
    seed_everything(cfg.seed)
    bare = build_model(cfg, num_classes=num_classes)
    if cfg.norm == "sync_bn" and seam.world_size > 1:
        if torch.device(seam.device).type != "cuda":  # torch's SyncBatchNorm runs on CUDA only
            raise UserError("norm: sync_bn needs GPU workers; on CPU use norm=group (or bn on one worker)")
        bare = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bare)  # BatchNorm statistics over all workers
    return bare.to(seam.device)


def optimisation(cfg: MaskRCNNConfig, bare, world_size: int, batches_per_epoch: int):
    """The run's optimizer and lr schedule. The optimizer holds every parameter any phase trains; frozen
    ones get no gradient (grad is None), which torch's optimizers skip, so a frozen stage keeps its weights
    and its momentum untouched."""
    set_trainable_layers(bare, max_trainable_layers(cfg))
    optimizer = build_optimizer(cfg, bare, world_size)
    steps = optimizer_steps_per_epoch(batches_per_epoch, cfg.accumulate_steps)
    return optimizer, build_scheduler(cfg, optimizer, steps)


def validation_of(cfg: MaskRCNNConfig, records: list) -> tuple[DataLoader, object]:
    """The validation images' loader (whole images, the config's normalisation) and COCO ground truth."""
    val_set = InstanceDataset(records, normalize=cfg.normalize)
    return DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate), coco_ground_truth(val_set)


def training_state(bare, optimizer, scheduler, scaler, epochs_done: int) -> dict:
    """What resuming needs besides the handed-over weights: the weights training continues from and the
    optimiser, schedule and loss-scaler states after `epochs_done` epochs."""
    return {
        "model": bare.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epochs_done,
    }


def _resume(
    cfg, seam, bare, optimizer, scheduler, scaler, best: BestEpoch, average: WeightAverage | None
) -> tuple[int, dict]:
    """Load the seam's latest checkpoint, if any, into the model, the training state, `best` and the
    weight average; the epoch to start at and the training state read ({} when starting afresh)."""
    resume = seam.latest_checkpoint()
    if resume is None:
        return 0, {}
    state = read_tensors(resume / "train_state.pt", seam.device)
    handed_over = read_state_dict(resume / "model.pt", seam.device)
    bare.load_state_dict(state.get("model", handed_over))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if "best_value" in state:
        best.load(state, handed_over if cfg.restore_best else None)
    if average is not None and "ema" in state:
        average.load(state)
    log.info("resumed from %s at epoch %d", resume, state["epoch"])
    return state["epoch"], state


def validate(cfg: MaskRCNNConfig, model, val_loader, device, ground_truth) -> dict[str, float]:
    """COCO and Kaggle metrics on the validation images: whole images, or in full-resolution mode tiled
    inference on each whole image at native resolution (as the model will be used on mosaics); and
    `val_ms_per_image`, the inference latency a multi-objective search can trade against accuracy. The
    config's inference filters (class_score_thresh, mask_min_area) apply, as they will in use. The Kaggle
    metric counts the detections at the operating point, `score_threshold`: the config's, or with
    choose_score_threshold the cut-off that scores best here (optimistic on these very images)."""
    images = len(val_loader.dataset)
    started = time.perf_counter()
    if not cfg.tile_size:
        results = predict(model, val_loader, device, cfg=cfg)
    else:
        results = predict_records(
            model,
            val_loader.dataset.records,
            device,
            tile_size=cfg.tile_size,
            tile_overlap=cfg.tile_overlap,
            tile_batch=cfg.batch_size,
            cfg=cfg,
        )
    # Prediction only (model, mask binarisation, RLE encoding; results are on the host, so GPU work has
    # finished), at the validation batch size: the COCO scoring below is not inference and would dominate
    # on dense images.
    ms_per_image = 1000 * (time.perf_counter() - started) / max(images, 1)
    cut = cfg.score_threshold
    if cfg.choose_score_threshold:  # the operating point of these weights, as a classifier's is chosen
        cut = best_cutoff(kaggle_by_cutoff(ground_truth, results))
    metrics = score_results(ground_truth, results, cfg.box_detections_per_img, cut)
    return {**metrics, "score_threshold": cut, "val_ms_per_image": ms_per_image}


def cutoff_with_tta(cfg: MaskRCNNConfig, model, weights: dict, records, device, ground_truth) -> float:
    """The operating point (the cut-off of the best Kaggle metric) of `model` with `weights` under the
    config's test-time augmentation, on the validation `records`: the model as it will be used. A copy is
    loaded: training's own model keeps its weights."""
    model = copy.deepcopy(model)
    model.load_state_dict(weights)
    results = predict_records(
        with_tta(model, cfg.tta).eval(),
        records,
        device,
        tile_size=cfg.tile_size,
        tile_overlap=cfg.tile_overlap,
        tile_batch=cfg.batch_size,
        cfg=cfg,
    )
    cut = best_cutoff(kaggle_by_cutoff(ground_truth, results))
    log.info("operating point with tta=%s: score >= %.2f", cfg.tta, cut)
    return cut


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker."""
    run_training(from_dict(MaskRCNNConfig, config, "trial config"), RaySeam())


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
    average: WeightAverage | None = None,
) -> dict[str, float]:
    """One pass over `loader`: one optimizer (and scheduler) step per `accumulate_steps` batches, and one
    for a shorter last group; autocast to `amp_dtype` with an optional GradScaler (fp16). The training loss
    is the sum of the loss terms with `loss_mask` times `mask_loss_weight`. Returns the mean of each loss
    term, `loss`, `images`, `images_per_s` and `optimizer_steps`. `average` is updated after every step."""
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
            if average is not None:
                average.update(model.module if ddp else model)
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
