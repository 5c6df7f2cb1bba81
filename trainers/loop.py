"""The Mask R-CNN training loop run on every Ray Train worker, and the Tune trial that launches it."""

import json
import logging
import math
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datasets.augment import augmentation, reseed, seed_worker
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
from trainers.config import MaskRCNNConfig, from_dict, to_dict, write_json
from trainers.engine import predict, score_results, train_one_epoch
from trainers.evaluation import predict_records
from trainers.maskrcnn import build_model
from trainers.ray_seam import NODE_KEYS
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
    # A short last group still steps (engine.train_one_epoch).
    return math.ceil(batches / accumulate_steps)


def autocast_dtype(cfg: MaskRCNNConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `cfg.amp`, or None; AMP is a GPU feature here (CPU autocast is not verified
    with torchvision's detection ops), so asking for it on CPU is a UserError naming the field."""
    if cfg.amp == "off":
        return None
    if torch.device(device).type != "cuda":
        raise UserError(f"amp: '{cfg.amp}' needs a GPU (this worker runs on {device}); use amp=off on CPU")
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


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


def config_split(cfg: MaskRCNNConfig) -> tuple[list, list]:
    """(train, val) image records of `cfg`: its data (or the bundled sample) split as training splits it."""
    records = read_records(cfg.data or SAMPLE_DATA, cfg.data_format)
    return train_val_split(records, cfg.val_fraction, cfg.seed, cfg.split_file)


def run_training(cfg: MaskRCNNConfig, seam) -> None:
    """Train `cfg.epochs` epochs; each epoch rank 0 evaluates and checkpoints, and all ranks report."""
    train_records, val_records = config_split(cfg)
    transform = augmentation(
        cfg.augment,
        cfg.seed + seam.rank,
        rotate=cfg.aug_rotate,
        scale=cfg.aug_scale,
        brightness=cfg.aug_brightness,
        contrast=cfg.aug_contrast,
        blur=cfg.aug_blur,
    )
    if cfg.tile_size:
        train_set = TiledInstanceDataset(
            train_records, cfg.tile_size, cfg.tile_overlap, cfg.tile_min_visible, transform
        )
        log.info("full-resolution mode: %d tiles of %d px per epoch", len(train_set), cfg.tile_size)
    else:
        train_set = InstanceDataset(train_records, transform)
    generator = torch.Generator()  # reseeded every epoch (seed_epoch); Ray's loader keeps this object
    loader = seam.prepare_loader(
        DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=cfg.loader_workers,
            worker_init_fn=seed_worker,  # a distinct augmentation stream per loader worker and epoch
            generator=generator,
        )
    )
    seed_everything(cfg.seed)  # identical initial weights on every rank
    bare = build_model(cfg, num_classes=len(train_set.categories))
    if cfg.norm == "sync_bn" and seam.world_size > 1:
        if torch.device(seam.device).type != "cuda":  # torch's SyncBatchNorm runs on CUDA only
            raise UserError("norm: sync_bn needs GPU workers; on CPU use norm=group (or bn on one worker)")
        bare = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bare)  # BatchNorm statistics over all workers
    bare = bare.to(seam.device)
    # The optimizer holds every parameter any phase trains; frozen ones get no gradient (grad is None),
    # which torch's optimizers skip, so a frozen stage keeps its weights and its momentum untouched.
    set_trainable_layers(bare, max_trainable_layers(cfg))
    optimizer = build_optimizer(cfg, bare, seam.world_size)
    steps_per_epoch = optimizer_steps_per_epoch(len(loader), cfg.accumulate_steps)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    amp_dtype = autocast_dtype(cfg, seam.device)
    # fp16 needs loss scaling against gradient underflow; bf16 has float32's exponent range and does not.
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    start_epoch = 0
    resume = seam.latest_checkpoint()
    if resume is not None:
        bare.load_state_dict(torch.load(resume / "model.pt", map_location=seam.device, weights_only=True))
        state = torch.load(resume / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    layers = phase_at(cfg, start_epoch)[0]
    set_trainable_layers(bare, layers)
    model = seam.prepare_model(bare)
    if seam.rank == 0:
        val_set = InstanceDataset(val_records)
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate)
        ground_truth = coco_ground_truth(val_set)
    for epoch in range(start_epoch, cfg.epochs):
        seed_epoch(cfg.seed, seam.rank, epoch, generator, transform)
        if phase_at(cfg, epoch)[0] != layers:
            layers = phase_at(cfg, epoch)[0]
            set_trainable_layers(bare, layers)
            if seam.world_size > 1:
                # DDP registers the parameters that require grad when it is built and all-reduces exactly
                # those: a stage unfrozen later would train unsynchronised on each rank, and a stage frozen
                # later would leave DDP waiting for gradients that never come. So wrap the model anew.
                model = seam.prepare_model(bare)
            log.info("epoch %d: %d backbone stages trainable", epoch, layers)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        started = time.perf_counter()
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
        )
        metrics = {f"train_{k}": v for k, v in stats.items()}
        metrics.update(
            epoch=epoch + 1,
            lr=optimizer.param_groups[0]["lr"],
            epoch_time_s=time.perf_counter() - started,
            torch_threads=torch.get_num_threads(),
            world_size=seam.world_size,
            resumed_at_epoch=start_epoch,  # > 0 after a restart: the epoch the checkpoint ended at
        )
        write = None
        if seam.rank == 0:
            metrics.update(validate(cfg, bare, val_loader, seam.device, ground_truth))

            def write(folder: Path, epoch=epoch) -> None:
                save_checkpoint(
                    folder,
                    cfg,
                    bare,
                    train_set.categories,
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch + 1,
                    },
                )

        seam.report(metrics, write)


def validate(cfg: MaskRCNNConfig, model, val_loader, device, ground_truth) -> dict[str, float]:
    """COCO and Kaggle metrics on the validation images: whole images, or in full-resolution mode tiled
    inference on each whole image at native resolution (as the model will be used on mosaics); and
    `val_ms_per_image`, the inference latency a multi-objective search can trade against accuracy. The
    config's inference filters (class_score_thresh, mask_min_area) apply, as they will in use."""
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
    metrics = score_results(ground_truth, results, cfg.box_detections_per_img)
    return {**metrics, "val_ms_per_image": ms_per_image}


CHECKPOINT_FILES = ("model.pt", "config.json", "categories.json")  # what inference needs (no optimizer state)


def save_checkpoint(folder: Path, cfg: MaskRCNNConfig, model, categories, train_state: dict) -> None:
    """model.pt (a state_dict, loads with weights_only=True), config.json, categories.json, train_state.pt."""
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save(train_state, folder / "train_state.pt")
    write_json(cfg, folder / "config.json")
    (folder / "categories.json").write_text(json.dumps(list(categories), indent=2) + "\n")


def load_checkpoint_model(folder: Path, device="cpu") -> tuple[torch.nn.Module, MaskRCNNConfig, list[dict]]:
    """The model of a checkpoint folder, in eval mode, with its config and categories."""
    cfg = from_dict(
        MaskRCNNConfig, json.loads((folder / "config.json").read_text()), str(folder / "config.json")
    )
    categories = json.loads((folder / "categories.json").read_text())
    model = build_model(_without_weights(cfg), num_classes=len(categories))
    model.load_state_dict(torch.load(folder / "model.pt", map_location=device, weights_only=True))
    return model.to(device).eval(), cfg, categories


def _without_weights(cfg: MaskRCNNConfig) -> MaskRCNNConfig:
    # The checkpoint's own tensors replace any initial weights: never download or read them again.
    return from_dict(MaskRCNNConfig, {**to_dict(cfg), "weights": "", "weights_backbone": ""}, "checkpoint")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker."""
    from trainers.ray_seam import RaySeam

    run_training(from_dict(MaskRCNNConfig, config, "trial config"), RaySeam())


def make_trainer(
    config: dict,
    *,
    name: str,
    storage_path: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    callbacks=(),
    checkpoints_to_keep: int | None = 1,
    max_failures: int = 0,
):
    """A Ray Train TorchTrainer of `num_workers` DDP workers (gloo on CPU, NCCL on GPU) running the loop of
    the config's task (Mask R-CNN or slice classifier, trainers/tasks.py).

    Train V2 keeps a run's per-epoch metrics with its checkpoints: keep them all (None) to read every
    epoch from `Result.metrics_dataframe`. When a worker process dies, Ray restarts the whole group up to
    `max_failures` times and the loop resumes from the latest checkpoint (at most one epoch is lost). A new
    trainer with the same `name` and `storage_path` continues a stopped run the same way (`--resume`).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainers.tasks import task_of

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        task_of(config).loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def tune_trial(config: dict, **trainer_kwargs) -> None:
    """One Tune trial = one Ray Train run (Train V2 inside Tune); its reports reach Tune via the callback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    name = ray.tune.get_context().get_trial_name()
    make_trainer(config, name=name, callbacks=[TuneReportCallback()], **trainer_kwargs).fit()


def mlflow_epoch_callback(tracking_uri: str, run_id: str):
    """A Ray Train callback that logs every epoch's numeric metrics (rank 0's, which include the
    evaluation) to the MLflow run `run_id`, with step = epoch. It runs in Ray Train's controller process,
    so it talks to the tracking server by URI and run id, not through the driver's active run."""
    import mlflow
    from mlflow.entities import Metric, RunTag
    from ray.train import UserCallback

    class MLflowEpochCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            values = metrics[0]
            step = int(values.get("epoch", 0))
            now = int(time.time() * 1000)
            batch = [
                Metric(key, float(value), now, step)
                for key, value in values.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            ]
            # the nodes' tags each epoch: a restarted worker group may run elsewhere
            tags = [RunTag(key, values[key]) for key in NODE_KEYS if key in values]
            mlflow.MlflowClient(tracking_uri).log_batch(run_id, metrics=batch, tags=tags)

    return MLflowEpochCallback()
