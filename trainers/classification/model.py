"""timm slice classifiers: build by name, freeze the backbone for the head-only phase, the two-phase lr
schedule, and a loaded model that classifies slices and whole volumes: probabilities, and decisions at its
operating point (operating_point.json in the checkpoint; argmax for checkpoints without one)."""

import difflib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models import get_pretrained_cfg_value

from datasets.coco import load_json
from datasets.errors import UserError
from datasets.progress import Progress
from datasets.slices import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from datasets.slicing import volume_slices
from datasets.volumes import VolumeRecord, load_volume
from trainers.checkpoints import load_into, read_state_dict
from trainers.classification.metrics import aggregate
from trainers.classification.operating_point import (
    OperatingPoint,
    decide,
    read_operating_point,
    save_operating_point,
)
from trainers.config import ClassifierConfig, from_dict, to_dict


def check_model_name(name: str) -> None:
    """A timm architecture, optionally with a pretrained tag (convnext_tiny.fb_in22k); UserError listing
    close names otherwise."""
    architecture = name.split(".")[0]
    known = timm.list_models()
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"model_name: '{name}' is not a timm model{hint}")


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> torch.nn.Module:
    """timm.create_model with the config's weights: none, timm's own (`pretrained=timm`, downloads), or a
    local file (a state_dict of the same architecture, any head: timm drops a head of another size and
    adapts the stem to in_chans=1 by summing the RGB filters)."""
    check_model_name(cfg.model_name)
    kwargs = dict(num_classes=num_classes, in_chans=cfg.in_chans, drop_rate=cfg.drop_rate)
    if cfg.pretrained == "timm":
        return timm.create_model(cfg.model_name, pretrained=True, **kwargs)
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise UserError(f"pretrained: weights file {path} not found")
        # source "" makes timm read the file even for models whose weights normally come from the HF hub
        overlay = dict(file=str(path), source="")
        try:
            return timm.create_model(
                cfg.model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).splitlines()[0][:300]
            raise UserError(f"pretrained: {path} does not fit {cfg.model_name} ({first})") from None
    return timm.create_model(cfg.model_name, pretrained=False, **kwargs)


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the model's weights expect (timm's pretrained config; ImageNet's by default)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def head_parameters(model: torch.nn.Module) -> set[int]:
    return {id(p) for p in model.get_classifier().parameters()}


def freeze_backbone(model: torch.nn.Module, frozen: bool) -> None:
    """Head-only training: everything but timm's classifier head stops learning."""
    head = head_parameters(model)
    for p in model.parameters():
        p.requires_grad = not frozen or id(p) in head


def backbone_norms_eval(model: torch.nn.Module) -> None:
    """While the backbone is frozen its BatchNorm layers keep their running statistics (as a frozen Keras
    layer does): call after model.train()."""
    head = model.get_classifier()
    head_modules = set(head.modules())
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m not in head_modules:
            m.eval()


def lr_at(cfg: ClassifierConfig, epoch: float, world_size: int = 1) -> float:
    """The lr at a fractional epoch: cosine from head_lr to 0 over the head-only phase, then cosine from lr
    with warm restarts every restart_epochs (one period to the end when 0), times a linear warm-up over the
    first warmup_epochs. A pure function of the epoch, so a resumed run needs no scheduler state."""
    scale = 1.0
    if cfg.lr_reference_batch > 0:
        scale = cfg.batch_size * world_size / cfg.lr_reference_batch
    if epoch < cfg.warmup_epochs:
        scale *= (epoch + 1e-3) / cfg.warmup_epochs
    if epoch < cfg.head_epochs:
        return scale * cfg.head_lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.head_epochs))
    t = epoch - cfg.head_epochs
    period = cfg.restart_epochs or max(cfg.epochs - cfg.head_epochs, 1e-9)
    return scale * cfg.lr * 0.5 * (1 + math.cos(math.pi * (t % period) / period))


CLASSIFIER_FILES = ("model.pt", "config.json", "classes.json")


@dataclass
class SliceClassifier:
    """A trained classifier ready for inference on uint8 slices (HxW grey or HxWx3)."""

    model: torch.nn.Module
    config: ClassifierConfig
    classes: list[str]
    device: str = "cpu"
    batch_size: int = 64
    operating_point: OperatingPoint | None = None  # how probabilities become a class; None: argmax

    @property
    def slicing(self) -> dict:
        return self.config.slicing()

    @property
    def aggregate(self) -> str:
        return self.config.aggregate

    @torch.inference_mode()
    def predict_proba(self, images) -> np.ndarray:
        mean, std = normalisation(self.model)
        cfg = self.config
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [
                    to_tensor(im, cfg.input_size, cfg.in_chans, mean, std)
                    for im in images[start : start + self.batch_size]
                ]
            )
            out.append(torch.softmax(self.model(batch.to(self.device)).float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images) -> np.ndarray:
        """The class index of every slice: the decision at the model's operating point."""
        return decide(self.predict_proba(images), self.operating_point)


def save_classifier(
    folder: Path,
    cfg: ClassifierConfig,
    weights: dict,
    classes: list[str],
    point: OperatingPoint | None = None,
) -> None:
    """model.pt (a state_dict), config.json, classes.json and the operating point (when there is one):
    what inference needs."""
    torch.save(weights, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    (folder / "classes.json").write_text(json.dumps(list(classes)) + "\n")
    save_operating_point(folder, point)


def check_classes(classes, where: Path) -> list[str]:
    """classes.json's content: a list of at least two distinct class names."""
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{where}: expected a list of at least two class names (text), got {classes!r:.200}")
    (most, count), *_ = Counter(classes).most_common(1)
    if count > 1:
        raise UserError(f"{where}: class name {most!r:.100} repeats")
    return classes


def check_head(state: dict, model_name: str, classes: int, folder: Path) -> None:
    """The weights' classifier head has one output per class of classes.json (checked before the model is
    built: a forged class list cannot make it larger than its weights file), where timm names the head."""
    head = get_pretrained_cfg_value(model_name, "classifier")
    bias = state.get(f"{head}.bias") if isinstance(head, str) else None
    if bias is not None and tuple(bias.shape) != (classes,):
        raise UserError(
            f"{folder / 'model.pt'}: a head of {tuple(bias.shape)} outputs, but "
            f"{folder / 'classes.json'} lists {classes} classes"
        )


def load_classifier_checkpoint(folder: Path, device: str = "cpu") -> SliceClassifier:
    folder = Path(folder)
    for name in CLASSIFIER_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} not found (a classifier checkpoint holds {CLASSIFIER_FILES})")
    cfg = from_dict(ClassifierConfig, load_json(folder / "config.json"), str(folder / "config.json"))
    # The checkpoint's tensors replace any initial weights: never download or read them again.
    cfg = replace(cfg, pretrained="")
    classes = check_classes(load_json(folder / "classes.json"), folder / "classes.json")
    state = read_state_dict(folder / "model.pt", device)
    check_head(state, cfg.model_name, len(classes), folder)
    model = build_classifier(cfg, len(classes))
    load_into(model, state, str(folder / "model.pt"))
    point = read_operating_point(folder, classes)  # None in checkpoints from before operating points
    return SliceClassifier(model.to(device).eval(), cfg, classes, str(device), operating_point=point)


def classify_volume(predictor, volume: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
    """(kept slices, their class probabilities N x C, the volume's probabilities C) of one loaded volume,
    sliced exactly as the predictor's training slices were (`predictor.slicing`)."""
    kept = kept_slices(predictor, volume)
    probs = predictor.predict_proba([s.image for s in kept])
    _, volume_probs = aggregate(probs, ["volume"] * len(kept), predictor.aggregate)
    return kept, probs, volume_probs[0]


def kept_slices(predictor, volume: np.ndarray) -> list:
    """The slices (datasets.slicing.SliceResult) of a loaded volume that the predictor classifies, cut
    as its training slices were (`predictor.slicing`); a UserError when none has enough object."""
    record = VolumeRecord(Path("volume"), "volume", "", "volume")
    kept = [s for s in volume_slices(record, volume, **predictor.slicing) if s.kept]
    if not kept:
        raise UserError(
            f"volume: no slice has {predictor.slicing['min_foreground']:.0%} object or more; "
            "nothing to classify"
        )
    return kept


def predict_volumes(predictor, records) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(slice probabilities N x C, specimen of each slice, class index of each slice) over labelled
    volumes (datasets.volumes.VolumeRecord), one volume in memory at a time; logs progress with ETA."""
    index_of = {c: i for i, c in enumerate(predictor.classes)}
    for r in records:
        if r.label not in index_of:
            raise UserError(
                f"{r.where}: label {r.label!r} is not a class of the model ({', '.join(predictor.classes)})"
            )
    probs, groups, labels = [], [], []
    log = logging.getLogger("datasets.volumes")  # shown by the CLIs' progress handler on "datasets"
    with Progress(len(records), "classified", "volumes", log.info, every_s=10.0) as bar:
        for r in records:
            try:
                _, p, _ = classify_volume(predictor, load_volume(r.path))
            except UserError as e:
                raise UserError(f"{r.where}: {r.path.name}: {e}") from None
            probs.append(p)
            groups += [r.specimen] * len(p)
            labels += [index_of[r.label]] * len(p)
            bar.update()
    return np.concatenate(probs), groups, np.array(labels)
