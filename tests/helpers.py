import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
