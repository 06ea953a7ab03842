"""Per-step schedules (App. C): lr warm-up + cosine, teacher momentum and weight decay cosines.

All are functions of the fractional epoch ``t = epoch + step / steps_per_epoch``.
"""

from __future__ import annotations

import math

import torch

from moca_eval.pretrain.config import PretrainConfig


def cosine(start: float, end: float, t: float, length: float) -> float:
    """Half-cosine from ``start`` (t=0) to ``end`` (t=length), constant ``end`` afterwards."""
    if t >= length:
        return end
    return end - 0.5 * (1.0 + math.cos(math.pi * t / length)) * (end - start)


def learning_rate(cfg: PretrainConfig, t: float) -> float:
    """Linear warm-up from 0 to the peak, then a cosine that reaches ``min_lr`` at
    ``lr_decay_epochs_mul * epochs`` (MOCA's script stops training at 1/1.25 of it)."""
    peak = cfg.base_lr()
    if t < cfg.warmup_epochs:
        return peak * t / cfg.warmup_epochs
    decay_epochs = cfg.lr_decay_epochs_mul * cfg.epochs - cfg.warmup_epochs
    return cosine(peak, cfg.min_lr, t - cfg.warmup_epochs, decay_epochs)


def teacher_momentum(cfg: PretrainConfig, t: float) -> float:
    """Cosine from ``momentum`` (0.99) to ``momentum_end`` (1.0) over the run."""
    return cosine(cfg.momentum, cfg.momentum_end, t, cfg.epochs)


def weight_decay(cfg: PretrainConfig, t: float) -> float:
    """Constant ``weight_decay``, or a cosine to ``weight_decay_end`` when that is set."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return cosine(cfg.weight_decay, cfg.weight_decay_end, t, cfg.epochs)


def apply_schedules(optimizer: torch.optim.Optimizer, cfg: PretrainConfig, t: float) -> float:
    """Set every group's lr and weight decay for time ``t``; return the backbone lr."""
    lr, wd = learning_rate(cfg, t), weight_decay(cfg, t)
    for group in optimizer.param_groups:
        generator = group.get("is_wgen", False)
        group["lr"] = cfg.lr_prototypes if generator and cfg.lr_prototypes is not None else lr
        if group.get("use_wd", False) and not generator:
            group["weight_decay"] = wd
    return lr
