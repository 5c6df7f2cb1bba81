"""A registered detector (torchvision Mask R-CNN) or slice classifier (timm) as one file that runs outside
Python: TorchScript (libtorch, C++) or ONNX (ONNX Runtime, any language), with a JSON beside it that says
how to feed it and read it (`platform.export` writes both; `load_exported` runs either, for the tests and
`platform.bench export`).

The graphs:
- detector: one image, `image` 3 x H x W float32 RGB in [0, 1] (the platform's `normalize` mode to 8-bit,
  then / 255), any H and W -> `boxes` N x 4 (x1, y1, x2, y2 in input pixels), `labels` N (category ids),
  `scores` N, `masks` N x 1 x H x W soft (binarise at the JSON's mask_threshold). Inside the graph, as in
  PyTorch: torchvision's resize (shorter side to min_size, longer at most max_size), its ImageNet
  normalisation, score threshold, NMS and top-k, and the boxes and masks mapped back to input pixels.
  Not inside: tiling (models trained on tiles of tile_size), shrinking images of large objects
  (object_diameter), class_score_thresh and mask_min_area, mask refinement (mask_refine), test-time
  augmentation, the operating point (score_threshold: the objects to report); the JSON gives each.
- classifier: `slices` N x C x S x S float32, normalised as the JSON says -> `probabilities` N x classes
  (the softmax is in the graph); the decision rule (operating point) is in the JSON.
Ensembles (detector mask-vote, classifier voting/patch) are not exported: their merging is Python code
around several models; export each member.

What works with torch 2.15.0 / torchvision 0.29.2 / onnxruntime 1.32.0 (tests/test_export.py checks
parity with PyTorch on sample images of several sizes):
- ONNX, detector: only the legacy TorchScript-based exporter, `torch.onnx.export(dynamo=False)`, with
  dynamic height and width (it warns that it is deprecated since 2.9). The dynamo exporter (dynamo=True,
  the default) fails in torch.export, also at a fixed size: `TorchExportError: Failed to export the model
  with torch.export. ... GuardOnDataDependentSymNode: Could not guard on data-dependent expression
  Eq(4*u1, 0) (unhinted: Eq(4*u1, 0)). (Size-like symbols: u1) ... Caused by: (torchvision/ops/boxes.py:103
  in _batched_nms_coordinate_trick)`.
- ONNX, classifier: the dynamo exporter, dynamic batch (the legacy one works too).
- TorchScript, both: `torch.jit.script` (FutureWarning: "`torch.jit.script` is deprecated. Please switch
  to `torch.compile` or `torch.export`", but it works).
- The detector's resize: eager torchvision computes the scale and size in float64. Scripted, it computes
  the scale in float32: the size is a pixel off eager's for about half of all image sizes (173 x 188 ->
  127 x 139 instead of 128 x 139). Traced for ONNX, scale and size are float32: about 6 % of sizes are off
  (61 x 61 -> 127 x 127 instead of 128 x 128; counted over 20-1500 px at min/max 128/160). A pixel changes
  the detections, so both exports resize with eager PyTorch's float64 arithmetic (`EagerSizeTransform`),
  and the tests check such sizes.
"""

import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from datasets.errors import UserError
from datasets.normalize import NORMALIZATIONS
from datasets.records import write_bytes_atomic, write_json_atomic
from datasets.slices import channel_stats
from deploy.batch import model_record, software
from trainers.classification.ensemble import is_classifier_folder
from trainers.classification.model import load_classifier_checkpoint, normalisation
from trainers.detection.combine import is_ensemble_folder
from trainers.detection.inference import mask_threshold_of
from trainers.detection.model import load_checkpoint_model

FORMATS = ("torchscript", "onnx")
OPSET = 18  # the ONNX opset of both exporters (the dynamo one converts to it)
DETECTOR_OUTPUTS = ("boxes", "labels", "scores", "masks")


class EagerSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform with eager PyTorch's resize arithmetic also in TorchScript and under ONNX
    tracing (module docstring): scale = min(min_size / shorter, max_size / longer) and size =
    int(side * scale) in float64, then bilinear."""

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if not torch.jit.is_scripting() and torchvision._is_tracing():
            return _traced_resize(image, float(self.min_size[-1]), float(self.max_size)), target
        height, width = image.shape[-2], image.shape[-1]
        scale = min(
            float(self.min_size[-1]) / float(min(height, width)),
            float(self.max_size) / float(max(height, width)),
        )
        size = [int(height * scale), int(width * scale)]
        resized = nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        return resized[0], target


@torch.jit.unused
def _traced_resize(image: Tensor, min_size: float, max_size: float) -> Tensor:
    """EagerSizeTransform's resize as operations on the traced shape, so that the ONNX graph computes the
    size of each input. The scale is a 1-d tensor: the legacy exporter computes 0-d ones in float32."""
    shape = operators.shape_as_tensor(image)[-2:].double()
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    size = torch.floor(shape * (limits / torch.stack([shape.min(), shape.max()])).min())
    # what F.interpolate calls; it refuses sizes that are tensors, which tracing needs to keep them dynamic
    return torch._C._nn.upsample_bilinear2d(image[None], [size[0], size[1]], False, None)[0]


class DetectorGraph(nn.Module):
    """Mask R-CNN on one image, its detections as four tensors (a dict is no ONNX output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if torch.jit.is_scripting():
            found = self.model([image])[1][0]  # scripted torchvision detectors return (losses, detections)
        else:
            found = self.model([image])[0]
        return found["boxes"], found["labels"], found["scores"], found["masks"]


class ClassifierGraph(nn.Module):
    """A timm classifier with its softmax: normalised slices in, class probabilities out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, slices: Tensor) -> Tensor:
        return torch.softmax(self.model(slices).float(), dim=1)


def sidecar(out: Path) -> Path:
    """The JSON beside an exported model file: its name + .json (model.onnx -> model.onnx.json)."""
    return out.with_name(out.name + ".json")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")


def export_model(folder: Path, fmt: str, out: Path, ref: str) -> dict:
    """Write the model of checkpoint `folder` (`ref`: the --model it came from) as `fmt` to `out` and its
    JSON beside it, each atomically (a temporary file renamed into place); returns the JSON's content."""
    check_format(fmt)
    if is_ensemble_folder(folder) or (folder / "ensemble.json").is_file():
        raise UserError(
            f"--model: {ref} is an ensemble; its merging is Python code around several models, so it is "
            "not exported: export each member"
        )
    if is_classifier_folder(folder):
        graph, example, info = classifier_graph(folder)
    else:
        graph, example, info = detector_graph(folder)
    with warnings.catch_warnings():
        # tracing and scripting torchvision warn about code paths the parity tests cover, and about the
        # exporters' deprecation (module docstring); on a terminal they are pages of noise
        warnings.simplefilter("ignore")
        data = to_torchscript(graph) if fmt == "torchscript" else to_onnx(graph, example, info["kind"])
    write_bytes_atomic(out, data)
    meta = {
        "format": fmt,
        "file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        **info,
        "model": model_record(ref),
        "exporter": exporter(fmt, info["kind"]),
        "software": {**software(), **optional_versions()},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(sidecar(out), meta, indent=2)
    return meta


def detector_graph(folder: Path) -> tuple[nn.Module, Tensor, dict]:
    """The checkpoint's Mask R-CNN as a DetectorGraph, an example input, and what the JSON says of it."""
    model, cfg, categories = load_checkpoint_model(folder, "cpu")
    t = model.transform
    model.transform = EagerSizeTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible)
    side = int(t.min_size[-1])
    # the trace does not depend on what the example shows: a blank image (no detections) exports the same
    # graph as one full of objects (checked when this was written)
    example = torch.zeros(3, side, side)
    info = {
        "kind": "detector",
        "architecture": f"torchvision Mask R-CNN, {cfg.backbone}",
        "classes": categories,
        "inputs": {"image": {"shape": [3, "height", "width"], "dtype": "float32"}},
        "outputs": {
            "boxes": {"shape": ["n", 4], "dtype": "float32", "meaning": "x1, y1, x2, y2 in input pixels"},
            "labels": {"shape": ["n"], "dtype": "int64", "meaning": "category id (classes)"},
            "scores": {"shape": ["n"], "dtype": "float32", "meaning": "best first"},
            "masks": {"shape": ["n", 1, "height", "width"], "dtype": "float32", "meaning": "soft masks"},
        },
        "input_size": {
            "height": "any",
            "width": "any",
            "resized_inside": {"min_size": side, "max_size": int(t.max_size)},
        },
        "preprocessing": detector_preprocessing(cfg, t),
        "postprocessing": {
            "mask_threshold": mask_threshold_of(cfg),
            "in_graph": {
                k: getattr(cfg, k) for k in ("box_score_thresh", "box_nms_thresh", "box_detections_per_img")
            },
            "class_score_thresh": list(cfg.class_score_thresh),
            "mask_min_area": cfg.mask_min_area,
            "mask_refine": cfg.mask_refine,  # outlines snapped to the foreground (detection/refine.py)
            "tta": cfg.tta,
            "score_threshold": cfg.score_threshold,  # the operating point: the objects the model reports
        },
    }
    return DetectorGraph(model).eval(), example, info


def detector_preprocessing(cfg, transform: GeneralizedRCNNTransform) -> dict:
    """What a caller does to an image before the detector graph, and what the graph does itself."""
    return {
        "normalize": cfg.normalize,
        "normalize_modes": f"one of {', '.join(NORMALIZATIONS)}: datasets/normalize.py, with the whole "
        "image's statistics (never one tile's); gives H x W x 3 uint8",
        "to_input": "H x W x 3 uint8 -> 3 x H x W float32 / 255",
        "in_graph": {
            "resize": "scale = min(min_size / shorter side, max_size / longer side); size = floor(side * "
            "scale); bilinear, align_corners=False; outputs come back in input pixels",
            "mean": list(transform.image_mean),
            "std": list(transform.image_std),
        },
        "tile_size": cfg.tile_size,  # > 0: the model saw tiles of this side at native resolution
        "tile_overlap": cfg.tile_overlap,
        "tiling": "tile_size > 0: cut the image into tile_size tiles overlapping by tile_overlap, run each, "
        "merge the pieces of objects cut by tile borders (datasets/tiles.py); 0: the whole image",
        "object_diameter": cfg.object_diameter,  # > 0: shrink images whose objects look larger first
    }


def classifier_graph(folder: Path) -> tuple[nn.Module, Tensor, dict]:
    """The checkpoint's timm model with its softmax, an example batch, and what the JSON says of it."""
    classifier = load_classifier_checkpoint(folder, "cpu")
    cfg = classifier.config
    means, stds = channel_stats(cfg.in_chans, *normalisation(classifier.model))
    size, chans = cfg.input_size, cfg.in_chans
    point = classifier.operating_point
    info = {
        "kind": "classifier",
        "architecture": f"timm {cfg.model_name}",
        "classes": classifier.classes,
        "inputs": {"slices": {"shape": ["batch", chans, size, size], "dtype": "float32"}},
        "outputs": {"probabilities": {"shape": ["batch", len(classifier.classes)], "dtype": "float32"}},
        "input_size": {"height": size, "width": size, "channels": chans},
        "preprocessing": {
            "to_input": "a uint8 slice (grey, or RGB whose first channel is taken for 1 channel), resized "
            "bilinear (OpenCV INTER_LINEAR) to input_size, repeated to the channels, / 255, then "
            "(x - mean) / std per channel (datasets/slices.py to_tensor)",
            "mean": means,
            "std": stds,
            "slicing": cfg.slicing(),  # how volumes were cut into the slices it was trained on
        },
        "postprocessing": {
            "operating_point": asdict(point) if point else None,
            "decision": "two classes: positive iff p(positive) >= threshold; more: argmax(p * weights); "
            "no operating point: argmax (trainers/classification/operating_point.py)",
            "volume_aggregate": cfg.aggregate,
        },
    }
    return ClassifierGraph(classifier.model).eval(), torch.zeros(2, chans, size, size), info


def to_torchscript(graph: nn.Module) -> bytes:
    try:
        scripted = torch.jit.script(graph)
    except RuntimeError as e:  # some timm models cannot be scripted
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(
            f"--format torchscript: TorchScript cannot compile this model ({first}); use onnx"
        ) from None
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def to_onnx(graph: nn.Module, example: Tensor, kind: str) -> bytes:
    """ONNX bytes: the legacy exporter for a detector (dynamo fails on it), dynamo for a classifier."""
    if kind == "detector":
        buffer = io.BytesIO()
        dims = {"image": {1: "height", 2: "width"}, "masks": {0: "n", 2: "height", 3: "width"}}
        dims |= {name: {0: "n"} for name in DETECTOR_OUTPUTS[:3]}
        torch.onnx.export(
            graph, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
            output_names=list(DETECTOR_OUTPUTS), dynamic_axes=dims,
        )  # fmt: skip
        return buffer.getvalue()
    program = torch.onnx.export(
        graph, (example,), dynamo=True, opset_version=OPSET, input_names=["slices"],
        output_names=["probabilities"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )  # fmt: skip
    return program.model_proto.SerializeToString()


def exporter(fmt: str, kind: str) -> str:
    resize = " (resize: deploy.export.EagerSizeTransform)" if kind == "detector" else ""
    if fmt == "torchscript":
        return "torch.jit.script" + resize
    return f"torch.onnx.export(dynamo={kind != 'detector'}, opset_version={OPSET})" + resize


def optional_versions() -> dict:
    """Versions of timm and the ONNX packages, beside batch.software()'s."""
    import onnx
    import onnxruntime
    import timm

    return {"timm": timm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def load_exported(path: Path, threads: int = 0) -> Callable[[np.ndarray], list[np.ndarray]]:
    """An exported model as a function: its input array -> its output arrays (in the JSON's order), on
    CPU, run by ONNX Runtime (`.onnx` per the JSON) or libtorch through torch.jit; `threads` > 0 sets
    ONNX Runtime's intra-op threads (libtorch's are torch.set_num_threads')."""
    meta = json.loads(sidecar(path).read_text())
    if meta["format"] == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # 3 = errors only: the detector's mask loop makes ORT warn of output shapes it cannot infer
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation (module docstring)
        module = torch.jit.load(str(path), map_location="cpu")

    @torch.inference_mode()
    def run(x: np.ndarray) -> list[np.ndarray]:
        with warnings.catch_warnings():
            # torchvision's scripted detectors say, on their first call, that they return (losses, detections)
            warnings.filterwarnings("ignore", "RCNN always returns", UserWarning)
            out = module(torch.from_numpy(x))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run
