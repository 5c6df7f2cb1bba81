"""Training throughput, as `python -m platform.bench train` and `bench gpu` measure it: the whole training
loop (trainers/detection/train.run_training) in a plain process or under Ray Train, and Mask R-CNN training
steps over batches prepared beforehand (the model's rate alone, without the loader's)."""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainers.config import MaskRCNNConfig

REPO = Path(__file__).resolve().parents[2]


def summary(reports: list[dict]) -> dict:
    """A side's images/s and epoch seconds over its epochs but the first (warm-up), and its thread count."""
    measured = reports[1:] or reports
    return {
        "images_per_s": statistics.mean(r["train_images_per_s"] for r in measured),
        "epoch_s": statistics.mean(r["epoch_time_s"] for r in measured),
        "per_epoch": [r["train_images_per_s"] for r in reports],
        "threads": int(reports[-1]["torch_threads"]),
    }


def plain_side(cfg: MaskRCNNConfig, threads: int, device: str | None = None) -> dict:
    """The training loop in this process (trainers.ray_seam.LocalSeam) on `device` (default: the GPU if
    there is one); summary() of its epochs."""
    from trainers.detection.train import run_training
    from trainers.ray_seam import LocalSeam

    torch.set_num_threads(threads)
    seam = LocalSeam(
        on_report=lambda m: print(f"[plain] epoch {m['epoch']}: {m['train_images_per_s']:.3f} img/s"),
        device=device,
    )
    run_training(cfg, seam)
    return summary(seam.reports)


def ray_side(cfg: MaskRCNNConfig, threads: int, gpus: float = 0) -> dict:
    """The same loop as one Ray Train worker of `threads` CPUs (and `gpus` GPUs), on a local Ray started
    as platform.tune and platform.train start it and shut down after; summary() of its epochs."""
    import ray

    from trainers.config import to_dict
    from trainers.ray_seam import init_ray
    from trainers.tasks import make_trainer

    init_ray(None, str(REPO))
    with tempfile.TemporaryDirectory() as storage:
        started = time.perf_counter()
        trainer = make_trainer(
            to_dict(cfg),
            name="bench",
            storage_path=storage,
            use_gpu=gpus > 0,
            cpus_per_worker=threads,
            gpus_per_worker=gpus,
            checkpoints_to_keep=None,
        )
        result = trainer.fit()
        print(f"[ray] fit took {time.perf_counter() - started:.1f} s including start-up")
        frame = result.metrics_dataframe
    ray.shutdown()
    return summary(frame.to_dict("records"))


def train_rate(
    cfg: MaskRCNNConfig, warm: list, timed: list, device: str = "cpu", channels_last: bool = False
) -> dict:
    """Mask R-CNN training steps of `cfg` as training takes them (its optimizer and warm-up schedule,
    gradient clipping, autocast to `cfg.amp` with fp16's GradScaler) over the `timed` batches, after the
    untimed `warm` ones (allocations, kernel choice): {"images_per_s", "peak_gib"}, the peak of the GPU
    memory allocated during the timed steps (None on CPU). `channels_last` stores the model's weights
    NHWC, which cuDNN's convolutions then also produce."""
    from trainers.detection.model import build_model
    from trainers.detection.train import build_optimizer, build_scheduler, train_one_epoch
    from trainers.run import autocast_dtype, grad_scaler

    model = build_model(cfg, num_classes=1).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    options = dict(
        scheduler=build_scheduler(cfg, optimizer, steps_per_epoch=len(warm) + len(timed)),  # keeps it finite
        grad_clip=cfg.grad_clip,
        amp_dtype=autocast_dtype(cfg, device),
        scaler=grad_scaler(cfg),
        mask_loss_weight=cfg.mask_loss_weight,
    )
    train_one_epoch(model, optimizer, warm, device, **options)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    stats = train_one_epoch(model, optimizer, timed, device, **options)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"images_per_s": stats["images_per_s"], "peak_gib": peak}
