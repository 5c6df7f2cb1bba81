"""The slice-classifier training loop run on every Ray Train worker (ForamDeepSlice, RECIPES.md section 2):
head-only phase, then everything; AdamW; label smoothing; Mixup/CutMix (timm); early stopping on the
validation loss; each epoch rank 0 validates at slice and volume level, chooses the operating point on the
validation volumes (trainers/classification/operating_point.py) and checkpoints it with the weights."""

import itertools
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from datasets.augment import augmentation
from datasets.slices import SAMPLE_VOLUMES, SliceDataset, evenly_spaced, slice_index, split_rows
from trainers.checkpoints import read_state_dict, read_tensors
from trainers.classification.metrics import operating_point_numbers, report
from trainers.classification.model import (
    backbone_norms_eval,
    build_classifier,
    freeze_backbone,
    lr_at,
    normalisation,
    save_classifier,
)
from trainers.classification.operating_point import (
    OperatingPoint,
    fit_operating_point,
    read_operating_point,
)
from trainers.config import ClassifierConfig, from_dict
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

log = logging.getLogger(__name__)


def slice_sets(cfg: ClassifierConfig, rank: int = 0) -> tuple[SliceDataset, SliceDataset, torch.nn.Module]:
    """Train and validation slices of `cfg.data` and a freshly built model (seeded: identical on every
    rank), the slices normalised as the model's weights expect."""
    index = slice_index(cfg.data or SAMPLE_VOLUMES, cfg.slicing())
    train_rows, val_rows, classes = split_rows(index, cfg.val_fraction, cfg.split_seed)
    seed_everything(cfg.seed)
    model = build_classifier(cfg, len(classes))
    mean, std = normalisation(model)
    common = dict(input_size=cfg.input_size, in_chans=cfg.in_chans, mean=mean, std=std)
    train = SliceDataset(
        train_rows,
        index.parent,
        classes,
        transform=augmentation(cfg.augment, cfg.seed + rank),
        per_specimen=cfg.slices_per_specimen,
        **common,
    )
    val = SliceDataset(evenly_spaced(val_rows, cfg.val_slices_per_specimen), index.parent, classes, **common)
    return train, val, model


def mixing(cfg: ClassifierConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (it also applies the label smoothing to the mixed targets), or None when off."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mix_prob,
        switch_prob=0.5,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def losses(cfg: ClassifierConfig, mixer: Mixup | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(training loss, validation loss), both label-smoothed: mixed batches come with soft targets, smoothed
    by the mixer."""
    val_loss = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return (SoftTargetCrossEntropy() if mixer else val_loss), val_loss


def run_training(cfg: ClassifierConfig, seam) -> None:
    """Train `cfg.epochs` epochs (trainers/run.py); each epoch rank 0 validates and checkpoints, and stops
    early when the validation loss has not improved for `early_stop_patience` epochs."""
    train_set, val_set, bare = slice_sets(cfg, seam.rank)
    classes = train_set.classes
    bare = bare.to(seam.device)
    generator = torch.Generator()
    # drop_last: Mixup/CutMix pair each batch with its reverse, so it needs an even batch
    loader = train_loader(seam, train_set, cfg.batch_size, cfg.loader_workers, generator, drop_last=True)
    # Over every parameter: frozen ones get no gradient (grad None), which AdamW skips entirely.
    optimizer = torch.optim.AdamW(
        bare.parameters(), lr=lr_at(cfg, 0.0, seam.world_size), weight_decay=cfg.weight_decay
    )
    amp_dtype = autocast_dtype(cfg, seam.device)
    scaler = grad_scaler(cfg)
    mixer = mixing(cfg, len(classes))
    train_loss, val_loss = losses(cfg, mixer)
    # best: the lowest validation loss so far, its epoch, epochs since and (restore_best) its weights;
    # best_point: the operating point chosen on the validation probabilities of those weights
    best = BestEpoch(higher_is_better=False)
    average = weight_average(cfg.ema_decay, bare)
    evaluated = validated_model(average, bare)
    start_epoch, best_point = _resume(cfg, seam, bare, optimizer, scaler, best, classes, average)
    if seam.rank == 0:
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size * 2, num_workers=cfg.loader_workers)

    def set_phase(head_only: bool) -> None:
        freeze_backbone(bare, head_only)
        log.info("backbone %s", "frozen" if head_only else "trainable")

    def train_epoch(model, epoch: int) -> dict:
        # the same draw on every rank: DistributedSampler then shards one epoch list
        train_set.resample(int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]))
        step = partial(
            train_step, optimizer=optimizer, loss_fn=train_loss, scaler=scaler, amp_dtype=amp_dtype
        )
        loss = train_one_epoch(cfg, model, bare, loader, optimizer, step, mixer, seam, epoch, average)
        return {"train_loss": loss, "lr": optimizer.param_groups[0]["lr"], "train_slices": len(train_set)}

    def end_epoch(epoch: int, metrics: dict):
        nonlocal best_point
        val_metrics, point = validate(evaluated, val_loader, val_set, val_loss, seam.device, cfg.aggregate)
        metrics.update(val_metrics)
        if best.update(metrics["val_loss"], epoch + 1, evaluated, keep_weights=cfg.restore_best):
            best_point = point
        stop = best.stop(cfg.early_stop_patience)
        metrics.update(best_val_loss=best.value, best_epoch=best.epoch, early_stopped=float(stop))
        state = {
            "model": bare.state_dict(),  # the weights training continues from
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch + 1,
            **best.state(),
            **(average.state() if average else {}),
        }
        # model.pt is the model this run hands over now: the best so far, or the latest; with the operating
        # point chosen on the validation probabilities of those very weights
        weights = best.weights if cfg.restore_best else evaluated.state_dict()
        handed_over = best_point if cfg.restore_best else point

        def write(folder: Path) -> None:
            save_classifier(folder, cfg, weights, classes, handed_over)
            torch.save(state, folder / "train_state.pt")

        return write, stop

    run_epochs(
        seam,
        cfg,
        start_epoch,
        bare,
        loader,
        generator,
        train_set.transform,
        phase_of=lambda epoch: epoch < cfg.head_epochs,
        set_phase=set_phase,
        train_epoch=train_epoch,
        end_epoch=end_epoch,
    )


def train_one_epoch(
    cfg: ClassifierConfig,
    model,
    bare,
    loader,
    optimizer,
    step,
    mixer,
    seam,
    epoch: int,
    average: WeightAverage | None = None,
) -> float:
    """One pass over `loader` (lr set per step by lr_at, Mixup/CutMix when on, `average` updated after
    every step), then precise BN statistics of the weights to be validated (the average when there is
    one) once the backbone trains; the mean training loss. `model` is `bare` as the seam prepared it
    (DDP)."""
    head_only = epoch < cfg.head_epochs
    model.train()
    if head_only:
        backbone_norms_eval(bare)
    steps, total = len(loader), 0.0
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(seam.device), targets.to(seam.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch + i / steps, seam.world_size)
        if mixer is not None:
            images, targets = mixer(images, targets)
        total += step(model, images, targets)
        if average is not None:
            average.update(bare)
    if not head_only and cfg.precise_bn_batches > 0:
        # every rank, from its own batches; DDP then broadcasts rank 0's buffers at the next forward. The
        # average's statistics are those of its own weights: its running averages of the raw model's lag
        update_bn(
            itertools.islice(loader, cfg.precise_bn_batches), validated_model(average, bare), seam.device
        )
    return total / max(steps, 1)


def train_step(model, images, targets, *, optimizer, loss_fn, scaler, amp_dtype) -> float:
    """One optimizer step (autocast to amp_dtype; fp16 with the GradScaler); the batch's loss."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = loss_fn(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.item()


def _resume(
    cfg: ClassifierConfig,
    seam,
    bare,
    optimizer,
    scaler,
    best: BestEpoch,
    classes: list[str],
    average: WeightAverage | None = None,
) -> tuple[int, OperatingPoint | None]:
    """Load the seam's latest checkpoint, if any, into the model, the training state, `best` and the weight
    average; the epoch to start at and (restore_best) the operating point of the best epoch's weights."""
    resume = seam.latest_checkpoint()
    if resume is None:
        return 0, None
    state = read_tensors(resume / "train_state.pt", seam.device)
    bare.load_state_dict(state["model"])
    point = None
    if cfg.restore_best:  # model.pt holds the best epoch's weights and operating point
        point = read_operating_point(resume, classes)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    best.load(state, read_state_dict(resume / "model.pt", seam.device) if cfg.restore_best else None)
    if average is not None and "ema" in state:
        average.load(state)
    log.info("resumed from %s at epoch %d", resume, state["epoch"])
    return state["epoch"], point


@torch.inference_mode()
def predict_loader(model, loader, device) -> tuple[np.ndarray, torch.Tensor]:
    """(probabilities N x C, logits N x C) of every image of a loader, in order."""
    model.eval()
    logits = torch.cat([model(images.to(device)).float().cpu() for images, _ in loader])
    return torch.softmax(logits, dim=1).numpy(), logits


def validate(
    model, loader, dataset: SliceDataset, loss_fn, device, method: str
) -> tuple[dict[str, float], OperatingPoint | None]:
    """Validation metrics at slice and volume level, and the operating point chosen on the validation
    volumes' probabilities with the decision metrics at it (`*_op_*`, optimistic: chosen on these very
    volumes) and its numbers (op_threshold or op_weight_<class>)."""
    probs, logits = predict_loader(model, loader, device)
    labels, specimens, classes = dataset.labels, dataset.specimens, dataset.classes
    metrics, details = report(probs, labels, specimens, classes, method)
    point = fit_operating_point(details["volume"]["probs"], details["volume"]["labels"], classes)
    if point is not None:
        metrics, _ = report(probs, labels, specimens, classes, method, point)
        metrics.update(operating_point_numbers(point))
    metrics["val_loss"] = float(loss_fn(logits, torch.from_numpy(labels)))
    return metrics, point


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker."""
    run_training(from_dict(ClassifierConfig, config, "trial config"), RaySeam())
