"""The Mask R-CNN training loop run on every Ray Train worker, and the Tune trial that launches it."""

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datasets.augment import augmentation, seed_worker
from datasets.instances import (
    SAMPLE_DATA,
    InstanceDataset,
    coco_ground_truth,
    collate,
    read_records,
)
from datasets.splits import train_val_split
from trainers.config import MaskRCNNConfig, from_dict, to_dict, write_json
from trainers.engine import evaluate, train_one_epoch
from trainers.maskrcnn import build_model

log = logging.getLogger(__name__)


def build_optimizer(cfg: MaskRCNNConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: MaskRCNNConfig, optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped per iteration: linear warm-up over `warmup_iters`, x`lr_gamma` at each epoch in `lr_steps`."""

    def factor(step: int) -> float:
        warm = 1.0
        if step < cfg.warmup_iters:
            warm = 1e-3 + (1 - 1e-3) * step / cfg.warmup_iters
        decays = sum(step >= e * steps_per_epoch for e in cfg.lr_steps)
        return warm * cfg.lr_gamma**decays

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: MaskRCNNConfig, seam) -> None:
    """Train `cfg.epochs` epochs; each epoch rank 0 evaluates and checkpoints, and all ranks report."""
    records = read_records(cfg.data or SAMPLE_DATA, cfg.data_format)
    train_records, val_records = train_val_split(records, cfg.val_fraction, cfg.seed, cfg.split_file)
    train_set = InstanceDataset(train_records, augmentation(cfg.augment, cfg.seed + seam.rank))
    loader = seam.prepare_loader(
        DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=cfg.loader_workers,
            worker_init_fn=seed_worker,  # a distinct augmentation stream per loader worker and epoch
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    )
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = seam.prepare_model(build_model(cfg, num_classes=len(train_set.categories)))
    bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=len(loader))
    start_epoch = 0
    resume = seam.latest_checkpoint()
    if resume is not None:
        bare.load_state_dict(torch.load(resume / "model.pt", map_location=seam.device, weights_only=True))
        state = torch.load(resume / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    if seam.rank == 0:
        val_set = InstanceDataset(val_records)
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate)
        ground_truth = coco_ground_truth(val_set)
    seed_everything(cfg.seed + 1000 * seam.rank + start_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(
            model, optimizer, loader, seam.device, scheduler=scheduler, grad_clip=cfg.grad_clip
        )
        metrics = {f"train_{k}": v for k, v in stats.items()}
        metrics.update(
            epoch=epoch + 1,
            lr=optimizer.param_groups[0]["lr"],
            epoch_time_s=time.perf_counter() - started,
            torch_threads=torch.get_num_threads(),
            world_size=seam.world_size,
        )
        write = None
        if seam.rank == 0:
            metrics.update(evaluate(bare, val_loader, seam.device, ground_truth, cfg.box_detections_per_img))

            def write(folder: Path, epoch=epoch) -> None:
                save_checkpoint(
                    folder,
                    cfg,
                    bare,
                    train_set.categories,
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                    },
                )

        seam.report(metrics, write)


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
):
    """A Ray Train TorchTrainer of `num_workers` DDP workers (gloo on CPU, NCCL on GPU) running the loop.

    Train V2 keeps a run's per-epoch metrics with its checkpoints: keep them all (None) to read every
    epoch from `Result.metrics_dataframe`.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep),
        ),
    )


def tune_trial(config: dict, **trainer_kwargs) -> None:
    """One Tune trial = one Ray Train run (Train V2 inside Tune); its reports reach Tune via the callback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    name = ray.tune.get_context().get_trial_name()
    make_trainer(config, name=name, callbacks=[TuneReportCallback()], **trainer_kwargs).fit()
