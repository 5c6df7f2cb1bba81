"""The loop under Ray Train with two DDP workers (gloo on CPU): data is sharded, rank 0 evaluates and
checkpoints, and the checkpoint loads."""

from pathlib import Path

import pytest
import ray

from trainers.config import apply_overrides, to_dict
from trainers.detection.model import load_checkpoint_model
from trainers.recipes import get_recipe
from trainers.tasks import make_trainer


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=True)
    yield
    ray.shutdown()


def test_two_workers_shard_the_data(local_ray, tiny_dataset, tmp_path):
    cfg = apply_overrides(
        get_recipe("dsb2018_demo"),
        {"data": str(tiny_dataset), "epochs": 1, "min_size": 128, "max_size": 160, "batch_size": 1},
    )
    result = make_trainer(to_dict(cfg), name="ddp", storage_path=str(tmp_path), num_workers=2).fit()
    metrics = result.metrics
    assert metrics["world_size"] == 2
    # 4 images, val_fraction 0.25 -> 3 training images; DistributedSampler pads to 4, 2 per rank
    assert metrics["train_images"] == 2
    assert "segm_AP" in metrics and "bbox_AP" in metrics
    # both ranks' nodes, gathered: one machine, one node (this driver's)
    assert metrics["ray_nodes"] == ray.get_runtime_context().get_node_id()
    assert metrics["ray_node_ips"] == ray.util.get_node_ip_address()
    model, loaded, _ = load_checkpoint_model(Path(result.checkpoint.path))
    assert loaded == cfg and not model.training
