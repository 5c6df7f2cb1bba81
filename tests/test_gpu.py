"""What only a GPU can check (`python -m pytest -m gpu`; the gpu_tests step of `python -m platform.bench gpu`
runs them on a GPU machine): fp16 with its GradScaler and bf16 training steps, sync_bn, DDP over NCCL,
tiled inference on the GPU against the CPU, and Serve with a GPU per replica. Short: the whole file has
under a minute of the check's 8. Without CUDA (CI) every test is skipped, saying why."""

import copy
import math
import multiprocessing
import queue
import socket
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
    ),
]
NCCL_WAIT_S = 30  # for the two ranks' answers: NCCL refuses two ranks on one GPU at once, or hangs


def tiny_config(**changes):
    """The demo recipe's ResNet-18-FPN Mask R-CNN (GroupNorm) at 128-160 px."""
    from trainers.config import apply_overrides
    from trainers.recipes import get_recipe

    return apply_overrides(get_recipe("dsb2018_demo"), {"min_size": 128, "max_size": 160, **changes})


def sample_batch(cfg, images: int = 2):
    """One training batch of the bundled sample, augmented as training does."""
    from datasets.instances import collate
    from trainers.detection.train import config_split, train_set_of

    dataset = train_set_of(cfg, config_split(cfg)[0], rank=0)
    return collate([dataset[i] for i in range(images)])


def train_steps(cfg, model, batch, steps: int, **options) -> list[float]:
    """`steps` training steps of the real loop (train_one_epoch) on one batch; each step's loss."""
    from trainers.detection.train import build_optimizer, train_one_epoch
    from trainers.run import autocast_dtype, grad_scaler

    optimizer = build_optimizer(cfg, model)
    options = (
        dict(grad_clip=cfg.grad_clip, amp_dtype=autocast_dtype(cfg, "cuda"), scaler=grad_scaler(cfg))
        | options
    )
    return [train_one_epoch(model, optimizer, [batch], "cuda", **options)["loss"] for _ in range(steps)]


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_an_amp_step_loses_no_nan_and_lowers_the_loss(amp):
    from trainers.detection.model import build_model

    cfg = tiny_config(amp=amp)
    torch.manual_seed(0)
    model = build_model(cfg, 1).cuda()
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    losses = train_steps(cfg, model, sample_batch(cfg), 16, scaler=scaler)  # a NaN loss raises in the loop
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if scaler is not None:  # skipped steps (inf gradients) halve the scale: it must not collapse
        assert scaler.get_scale() >= 1.0
    assert np.mean(losses[-3:]) < losses[0], losses


def test_sync_bn_converts_and_trains():
    from trainers.detection.model import build_model

    cfg = tiny_config(norm="sync_bn", trainable_backbone_layers=5)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg, 1)).cuda()
    kinds = Counter(type(m).__name__ for m in model.modules())
    assert kinds["SyncBatchNorm"] > 0 and kinds["BatchNorm2d"] == 0, kinds
    losses = train_steps(cfg, model, sample_batch(cfg), 2)
    assert all(math.isfinite(loss) for loss in losses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_rank(rank: int, world: int, port: int, answers) -> None:
    """One rank on GPU 0: a SyncBatchNorm model under DDP, one step on this rank's own input; answers its
    gradient and BatchNorm running mean (both must be the same on every rank), or the error."""
    try:
        torch.cuda.set_device(0)
        torch.distributed.init_process_group(
            "nccl",
            f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=NCCL_WAIT_S),
        )
        layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(layers).cuda(), device_ids=[0]
        )
        torch.manual_seed(rank)  # a different input on each rank
        model(torch.randn(2, 3, 8, 8, device="cuda") * (rank + 1)).square().mean().backward()
        # as lists: a tensor would travel as shared memory that dies with this process
        grad, mean = model.module[0].weight.grad.tolist(), model.module[1].running_mean.tolist()
        answers.put((rank, grad, mean, None))
        torch.distributed.destroy_process_group()
    except Exception as e:  # the parent says why NCCL would not
        answers.put((rank, None, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"))


def test_nccl_ddp_with_two_processes_on_one_gpu():
    spawn = multiprocessing.get_context("spawn")
    answers, port = spawn.Queue(), free_port()
    ranks = [spawn.Process(target=ddp_rank, args=(rank, 2, port, answers)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        got = sorted(answers.get(timeout=NCCL_WAIT_S + 30) for _ in ranks)
    except queue.Empty:
        got = None
    finally:
        for process in ranks:
            process.join(5)
            if process.is_alive():
                process.kill()
    if got is None:
        pytest.skip(f"NCCL did not answer in {NCCL_WAIT_S + 30} s with two ranks on one GPU (hung)")
    errors = [error for *_, error in got if error]
    if errors and any(word in errors[0].lower() for word in ("nccl", "duplicate gpu")):
        pytest.skip(f"NCCL refuses two ranks on one GPU: {errors[0]}")
    assert not errors, errors
    (_, grad0, mean0, _), (_, grad1, mean1, _) = got
    assert grad0 == grad1  # DDP averaged the two ranks' gradients
    assert np.allclose(mean0, mean1)  # SyncBatchNorm's statistics came from both ranks' inputs


def test_nccl_one_rank_group_trains_the_detector_under_ddp():
    from trainers.detection.model import build_model

    cfg = tiny_config()
    torch.distributed.init_process_group("nccl", f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(cfg, 1).cuda(), device_ids=[0])
        # two batches per optimizer step: the first under DDP's no_sync, the second all-reduces
        losses = train_steps(cfg, model, sample_batch(cfg), 2, accumulate_steps=2)
    finally:
        torch.distributed.destroy_process_group()
    assert all(math.isfinite(loss) for loss in losses)


def test_tiled_inference_on_the_gpu_matches_the_cpu():
    from platform.benchmarks.tiled import box_iou, greedy_matches, random_detector_config, sample_mosaic
    from trainers.detection.inference import predict_tiled
    from trainers.detection.model import build_model

    torch.manual_seed(0)
    model = build_model(random_detector_config("resnet18_fpn", 256), 1).eval()
    image = sample_mosaic(512)
    settings = dict(tile_size=256, overlap=64, batch_size=4, score_threshold=0.5)
    cpu = predict_tiled(model, image, device="cpu", **settings)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 on both sides
    try:
        gpu = predict_tiled(copy.deepcopy(model).cuda(), image, device="cuda", **settings)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    n = len(cpu.scores)
    assert n > 0 and abs(len(gpu.scores) - n) <= 0.02 * n + 1
    assert greedy_matches(box_iou(cpu.boxes, gpu.boxes), 0.9) >= 0.95 * n
    assert abs(float(cpu.scores.mean()) - float(gpu.scores.mean())) < 1e-3
    cpu_area = sum(int(m.sum()) for m in cpu.masks)
    assert abs(sum(int(m.sum()) for m in gpu.masks) - cpu_area) <= 0.02 * cpu_area


def test_serve_with_one_gpu_per_replica_answers(tmp_path):
    for package in ("ray", "mlflow", "fastapi"):
        pytest.importorskip(package)
    import requests

    from platform.benchmarks.serve import RAW, random_models, sample_inputs
    from tests.helpers import mlflow_uris_restored
    from tests.serving import start_server

    with mlflow_uris_restored():
        uri, detector, _ = random_models(tmp_path)
    server = start_server(uri, "--detector", detector, "--gpus-per-replica", "1", log=tmp_path / "serve.log")
    try:
        answer = requests.post(
            f"{server.url}/v1/segment", data=sample_inputs().image_body, headers=RAW, timeout=120
        )
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["count"] == len(answer.json()["instances"])
