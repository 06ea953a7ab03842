"""Checkpoints in MOCA's layout, written atomically, and exact resumption.

``checkpoint-last.pth`` is what MOCA's ``util/misc.py: save_model`` writes:
``{'model': MOCA.state_dict(), 'optimizer', 'epoch' (last finished, 0-based), 'args'
(argparse.Namespace), 'scaler'}``, teacher weights under ``encoder_teacher.``.
``teacher.pth`` is ``{'model': teacher backbone}`` with timm's keys, as MOCA's
``extract_teacher_from_checkpoint.py`` writes. Files are read back with the core's safe
loader (``weights_only=True`` plus an allow-list), never by unpickling arbitrary objects.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.pretrain.config import PretrainConfig
from moca_eval.results import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint-last.pth"
TEACHER = "teacher.pth"
# Settings that may differ when resuming without changing the training itself.
RUNTIME_FIELDS = frozenset({"data_dir", "output_dir", "resume", "num_workers", "device",
                            "progress", "save_every", "epochs"})


def moca_model_name(cfg: PretrainConfig) -> str:
    """A MOCA-style model name, e.g. ``moca_vit_base_patch16_dec512d2b``."""
    return f"moca_{cfg.arch}_patch{cfg.patch_size}_dec{cfg.decoder_dim}d{cfg.decoder_depth}b"


def training_args(cfg: PretrainConfig, *, world_size: int) -> argparse.Namespace:
    """The checkpoint's ``args``: our settings plus MOCA's names for the main ones."""
    return argparse.Namespace(
        **cfg.to_dict(), model=moca_model_name(cfg), input_size=cfg.img_size,
        world_size=world_size, mask_ratio=list(cfg.mask_ratios),
    )


def save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def save_teacher(path: Path, model: torch.nn.Module) -> Path:
    """``{'model': teacher backbone}`` with timm's keys (MOCA's extracted-teacher file)."""
    prefix = "encoder_teacher."
    state = model.state_dict()
    return save_atomic({"model": {k.removeprefix(prefix): v for k, v in state.items()
                                  if k.startswith(prefix)}}, Path(path))


def save_checkpoint(run_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, cfg: PretrainConfig, world_size: int,
                    scaler: dict[str, Any] | None = None) -> Path:
    """Write ``teacher.pth`` and ``checkpoint-last.pth`` (and ``checkpoint-<epoch>.pth``)."""
    save_teacher(run_dir / TEACHER, model)
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "args": training_args(cfg, world_size=world_size), "scaler": scaler or {}}
    if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
        save_atomic(ckpt, run_dir / f"checkpoint-{epoch}.pth")
    return save_atomic(ckpt, run_dir / CHECKPOINT)


def saved_config(ckpt: dict[str, Any], *, path: Path) -> PretrainConfig:
    """The ``PretrainConfig`` recorded in a checkpoint's ``args``."""
    args = ckpt.get("args")
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path}: no argparse.Namespace 'args' (not written by moca-eval pretrain?)")
    return PretrainConfig.from_dict(vars(args))


def check_same_training(saved: PretrainConfig, cfg: PretrainConfig, *, path: Path) -> None:
    """Refuse to resume with settings that change the training (runtime fields may differ)."""
    changed = [f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in saved.to_dict().items()
               if k not in RUNTIME_FIELDS and cfg.to_dict()[k] != v]
    if changed:
        raise ConfigError(f"{path}: cannot resume with different settings: {'; '.join(changed[:4])}")
    if saved.epochs != cfg.epochs:
        log.warning("resuming with epochs %d (was %d): the lr and momentum schedules change",
                    cfg.epochs, saved.epochs)


def load_for_resume(run_dir: Path, cfg: PretrainConfig, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> int:
    """Restore model and optimizer from ``run_dir/checkpoint-last.pth``; return the next epoch."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{path}: nothing to resume (no checkpoint); drop --resume to start anew")
    ckpt = dict(read_checkpoint(path))
    check_same_training(saved_config(ckpt, path=path), cfg, path=path)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not match this model/optimizer: {first}") from None
    log.info("resumed from %s (epoch %d finished)", path, ckpt["epoch"])
    return int(ckpt["epoch"]) + 1
