"""Learning-rate schedules and per-phase trainable layers, read from the flat MaskRCNNConfig.

`lr_factor(cfg, step, steps_per_epoch)` is the multiplier of the base lr at optimizer step `step` (0-based);
`torch.optim.lr_scheduler.LambdaLR` turns it into a scheduler stepped once per optimizer step. All the
schedule fields multiply together, so e.g. warm-up combines with any decay.
"""

import math

from trainers.config import MaskRCNNConfig, parse_phase

# torchvision's ResNet stages counted from the top, as resnet_fpn_backbone(trainable_layers=n) reads them
# (backbone_utils.py: ["layer4", "layer3", "layer2", "layer1", "conv1"][:n], plus "bn1" when n == 5).
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def lr_factor(cfg: MaskRCNNConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step`; `steps_per_epoch` converts epoch fields to steps."""
    factor = 1.0
    if step < cfg.warmup_iters:  # linear from 1/1000 to 1 (torchvision's and Detectron2's warm-up)
        factor *= 1e-3 + (1 - 1e-3) * step / cfg.warmup_iters
    decays = sum(step >= e * steps_per_epoch for e in cfg.lr_steps)
    decays += sum(step >= i for i in cfg.lr_step_iters)
    factor *= cfg.lr_gamma**decays
    if cfg.lr_decay_every > 0 and step >= cfg.lr_decay_start:
        # Detectron2-style "x0.8 every 1000 iterations from 2000": the first decay lands at lr_decay_start.
        factor *= cfg.lr_decay_factor ** ((step - cfg.lr_decay_start) // cfg.lr_decay_every + 1)
    if cfg.cosine_period_epochs > 0:
        factor *= _cosine_restarts(cfg, step, steps_per_epoch)
    return factor * phase_at(cfg, step // max(steps_per_epoch, 1))[1]


def _cosine_restarts(cfg: MaskRCNNConfig, step: int, steps_per_epoch: int) -> float:
    # Same curve as torch's CosineAnnealingWarmRestarts(T_0, T_mult, eta_min) stepped per iteration:
    # period i lasts T_0 * T_mult**i steps, and the lr falls from lr to lr_min along half a cosine.
    period = max(1, round(cfg.cosine_period_epochs * steps_per_epoch))
    t = step
    while t >= period:
        t -= period
        period *= cfg.cosine_period_mult
    floor = cfg.lr_min / cfg.lr
    return floor + (1 - floor) * (1 + math.cos(math.pi * t / period)) / 2


def phase_at(cfg: MaskRCNNConfig, epoch: int) -> tuple[int, float]:
    """(trainable backbone stages, lr factor) in force at 0-based `epoch`."""
    layers, factor = cfg.trainable_backbone_layers, 1.0
    for start, n, f in sorted(parse_phase(p) for p in cfg.phases):
        if epoch >= start:
            layers, factor = n, f
    return layers, factor


def max_trainable_layers(cfg: MaskRCNNConfig) -> int:
    """The most stages any phase trains: the optimizer is built over these so no phase lacks its params."""
    return max([cfg.trainable_backbone_layers] + [parse_phase(p)[1] for p in cfg.phases])


def set_trainable_layers(model, layers: int) -> None:
    """Make the top `layers` ResNet stages of a Mask R-CNN's backbone trainable and freeze the rest.

    Only the ResNet body changes: FPN, RPN and ROI heads always train, as in torchvision's builders.
    """
    prefixes = list(RESNET_STAGES[:layers]) + (["bn1"] if layers == 5 else [])
    for name, param in model.backbone.body.named_parameters():
        param.requires_grad_(name.startswith(tuple(prefixes)))
