"""The one per-worker training skeleton both tasks (Mask R-CNN, slice classifier) run, on a Ray Train
worker (RaySeam) or in a plain process (LocalSeam): per-epoch seeding, the trainable-phase switch with its
DDP re-wrap, the distributed sampler's epoch, rank 0's validation and checkpoint, the report (a barrier)
and early stopping. A task supplies what differs as plain functions (trainers/detection/train.py,
trainers/classification/train.py); resuming from `seam.latest_checkpoint()` is the task's, since each
keeps its own state."""

import logging
import math
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datasets.augment import reseed, seed_worker
from datasets.errors import UserError

log = logging.getLogger(__name__)

WriteCheckpoint = Callable[[Path], None]


@dataclass
class BestEpoch:
    """A run's best validation value so far, its epoch (1-based), the epochs since, and a copy of its
    weights (restore_best, Keras' restore_best_weights): the model a run hands over is its best epoch,
    not its last, and early stopping counts the epochs without improvement."""

    higher_is_better: bool
    value: float = math.nan  # nan until the first validation
    epoch: int = 0
    bad_epochs: int = 0
    weights: dict | None = None

    def update(self, value: float, epoch: int, model: torch.nn.Module, keep_weights: bool) -> bool:
        """Record epoch `epoch`'s validation value; True when it is the best so far."""
        better = (value > self.value + 1e-6) if self.higher_is_better else (value < self.value - 1e-6)
        if not (better or math.isnan(self.value)):
            self.bad_epochs += 1
            return False
        self.value, self.epoch, self.bad_epochs = value, epoch, 0
        if keep_weights:  # a copy: training goes on changing the model's own tensors
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs without improvement (0 = never)."""
        return patience > 0 and self.bad_epochs >= patience

    def state(self) -> dict:
        """What a checkpoint keeps of it (the weights are the checkpoint's model.pt)."""
        return {"best_value": self.value, "best_epoch": self.epoch, "bad_epochs": self.bad_epochs}

    def load(self, state: dict, weights: dict | None) -> None:
        self.value, self.epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs, self.weights = state["bad_epochs"], weights


class WeightAverage:
    """An exponential moving average of a model's weights and buffers, updated after every optimizer step
    (timm's ModelEmaV3 with its warm-up: decay 1 - step^(-2/3), at most `decay`; 0.99 after 1000 steps),
    as Ultralytics, Detectron2 and timm train. Training goes on from the raw weights; validation, the best
    epoch and the handed-over model are the average, which moves less from step to step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from timm.utils.model_ema import ModelEmaV3  # timm loads in seconds: only when averaging

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        self.steps = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.ema.module

    def update(self, model: torch.nn.Module) -> None:
        """After an optimizer step of `model` (the bare one, not a DDP wrapper)."""
        self.steps += 1
        self.ema.update(model, step=self.steps)

    def state(self) -> dict:
        return {"ema": self.ema.module.state_dict(), "ema_steps": self.steps}

    def load(self, state: dict) -> None:
        self.ema.module.load_state_dict(state["ema"])
        self.steps = state["ema_steps"]


def weight_average(decay: float, model: torch.nn.Module) -> WeightAverage | None:
    """The run's WeightAverage of `model`, or None when `decay` is 0 (off)."""
    return WeightAverage(model, decay) if decay > 0 else None


def validated_model(average: WeightAverage | None, model: torch.nn.Module) -> torch.nn.Module:
    """The weights a run validates and hands over: the average when there is one, else `model` itself."""
    return average.model if average is not None else model


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `cfg.amp`, or None. bf16 runs on CPUs too (1.3x images/s for the CPU Mask
    R-CNN recipe on a CPU with AVX-512 BF16, `platform.bench train`); fp16 autocast is a GPU feature, so
    asking for it on CPU is a UserError naming the field."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "bf16":
        if torch.device(device).type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning(
                "amp: bf16 on a CPU without native bf16 (AVX-512 BF16, AMX) is emulated, maybe slower"
            )
        return torch.bfloat16
    if torch.device(device).type != "cuda":
        raise UserError(f"amp: 'fp16' needs a GPU (this worker runs on {device}); on CPU use off or bf16")
    return torch.float16


def grad_scaler(cfg) -> torch.amp.GradScaler | None:
    """The GradScaler `cfg.amp` needs: fp16 needs loss scaling against gradient underflow; bf16 has
    float32's exponent range and does not."""
    return torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, rank: int, epoch: int, generator: torch.Generator, transform) -> None:
    """Reseed every random stream of one rank at the start of an epoch: the global ones (torch's RPN/ROI
    samplers), the loader's shuffle and worker seeds, and the augmentation. The random state at an epoch
    boundary is then a function of (seed, rank, epoch), all in the checkpoint, so a resumed run draws
    exactly what the uninterrupted one would on every rank, without gathering each rank's RNG state."""
    derived = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    seed_everything(derived)
    generator.manual_seed(derived)
    if transform is not None:
        reseed(transform, derived)


def train_loader(seam, dataset, batch_size: int, workers: int, generator: torch.Generator, **options):
    """The training DataLoader, prepared by the seam (DistributedSampler and device moves under DDP). Its
    shuffle uses `generator`, which seed_epoch reseeds every epoch (Ray's loader keeps this object), and
    every loader worker gets its own augmentation stream per epoch (seed_worker)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        worker_init_fn=seed_worker,
        generator=generator,
        **options,
    )
    return seam.prepare_loader(loader)


def run_epochs(
    seam,
    cfg,
    start_epoch: int,
    bare: torch.nn.Module,
    loader,
    generator: torch.Generator,
    transform,
    *,
    phase_of: Callable[[int], Hashable],
    set_phase: Callable[[Hashable], None],
    train_epoch: Callable[[torch.nn.Module, int], dict],
    end_epoch: Callable[[int, dict], tuple[WriteCheckpoint | None, bool]],
) -> None:
    """Epochs start_epoch..cfg.epochs-1 of a task on every rank, seeded from cfg.seed; `transform` is the
    training set's augmentation (reseeded with everything else each epoch).

    phase_of(epoch): what is trainable in that epoch (hashable); set_phase applies it to `bare`.
    train_epoch(model, epoch): one pass over `loader` with the (possibly DDP-wrapped) model; its metrics.
    end_epoch(epoch, metrics), rank 0 only: adds the validation metrics to `metrics` and returns the
    function that writes this epoch's checkpoint folder, and whether to stop early.
    """
    phase = phase_of(start_epoch)
    set_phase(phase)
    model = seam.prepare_model(bare)
    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, seam.rank, epoch, generator, transform)
        if phase_of(epoch) != phase:
            phase = phase_of(epoch)
            set_phase(phase)
            if seam.world_size > 1:
                # DDP registers the parameters that require grad when it is built and all-reduces exactly
                # those: a part unfrozen later would train unsynchronised on each rank, and a part frozen
                # later would leave DDP waiting for gradients that never come. So wrap the model anew.
                model = seam.prepare_model(bare)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        started = time.perf_counter()
        metrics = train_epoch(model, epoch)
        metrics.update(
            epoch=epoch + 1,
            epoch_time_s=time.perf_counter() - started,
            world_size=seam.world_size,
            resumed_at_epoch=start_epoch,  # > 0 after a restart: the epoch the checkpoint ended at
        )
        write, stop = end_epoch(epoch, metrics) if seam.rank == 0 else (None, False)
        seam.report(metrics, write)
        if seam.share(stop):  # rank 0's decision on every rank
            log.info("early stop after epoch %d", epoch + 1)
            break
