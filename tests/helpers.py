import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from trainers.detection.combine import mask_boxes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "datasets" / "sample" / "dsb2018"


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 900, env: dict | None = None):
    """Run `python -m ...` the way a user does, from the repo root, and capture everything."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def sample_subset(dest: Path, n: int) -> Path:
    """The first `n` images of the bundled DSB2018 sample copied into `dest` (a small dataset to train on)."""
    for folder in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:n]:
        shutil.copytree(folder, dest / folder.name)
    return dest


@contextlib.contextmanager
def mlflow_uris_restored():
    """MLflow keeps its URIs in globals and in the environment (which subprocesses of later tests inherit):
    put both back afterwards."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        mlflow.set_registry_uri("")  # "" = follow the tracking URI again
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def masks_ground_truth(images, size: int, categories=({"id": 1, "name": "nucleus"},), file_names=False):
    """A pycocotools COCO of hand-made binary masks, one list per image (ids 1..N, category 1), images of
    size x size pixels (file names /data/img<N>.png with `file_names`)."""
    import io

    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    annotations = []
    for image_id, masks in enumerate(images, start=1):
        for mask in masks:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": [
            {
                "id": i,
                "height": size,
                "width": size,
                **({"file_name": f"/data/img{i}.png"} if file_names else {}),
            }
            for i in range(1, len(images) + 1)
        ],
        "annotations": annotations,
        "categories": list(categories),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


class ThresholdDetector(torch.nn.Module):
    """Instances = 4-connected components of channel 0 above `level`; score = the component's mean
    intensity; soft mask = 0.5 + intensity / 2 inside, intensity / 3 outside (below 0.5); box = extent.
    Every part commutes with flips and 90-degree rotations."""

    def __init__(self, level: float = 0.55, label: int = 1):
        super().__init__()
        self.level, self.label = level, label
        self.roi_heads = type("Heads", (), {"detections_per_img": 100})()  # as a Mask R-CNN's

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self.detect(image[0]) for image in images]

    def detect(self, grey: torch.Tensor) -> dict:
        components, n = ndimage.label(grey.numpy() > self.level)
        binary = torch.from_numpy(components[None] == np.arange(1, n + 1)[:, None, None])
        scores = torch.stack([grey[b].mean() for b in binary]) if n else torch.zeros(0)
        soft = torch.where(binary, 0.5 + grey / 2, grey / 3)
        order = torch.argsort(scores, descending=True)[: self.roi_heads.detections_per_img]
        return {
            "boxes": mask_boxes(binary)[order],
            "scores": scores[order],
            "labels": torch.full((n,), self.label, dtype=torch.long)[order],
            "masks": soft[order, None].float(),
        }


def random_checkpoint(folder, data, seed: int):
    """A random-weight ResNet-18 Mask R-CNN checkpoint on `data` (small inputs, few proposals: seconds)."""
    from trainers.config import MaskRCNNConfig
    from trainers.detection.model import build_model, save_checkpoint
    from trainers.detection.train import config_split

    cfg = MaskRCNNConfig(
        data=str(data),
        backbone="resnet18_fpn",
        min_size=128,
        max_size=160,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_detections_per_img=20,
        mask_head_channels=64,
    )
    categories = config_split(cfg)[0][0].categories
    torch.manual_seed(seed)
    folder.mkdir()
    save_checkpoint(folder, cfg, build_model(cfg, len(categories)), categories, {})
    return folder


def write_marker(path: str):
    """What the forged pickles of the tests (RunsCode) run when unpickled: a file that says so."""
    Path(path).write_text("unpickled\n")
    return {}


class RunsCode:
    """An object whose pickle runs write_marker (pickle's __reduce__: a callable and its arguments)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return write_marker, (self.marker,)
