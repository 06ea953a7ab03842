"""Checkpoints in MOCA's layout, written atomically, and exact resumption (ours or MOCA's).

``checkpoint-last.pth`` is what MOCA's ``util/misc.py: save_model`` writes:
``{'model': MOCA.state_dict(), 'optimizer', 'epoch' (last finished, 0-based), 'args'
(argparse.Namespace)}`` plus ``'scaler'`` (the ``GradScaler`` state) when training in fp16,
every key under MOCA's own name (``official.py``), teacher weights under ``encoder_teacher.``.
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
from moca_eval.pretrain import official
from moca_eval.pretrain.config import PretrainConfig
from moca_eval.results import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint-last.pth"
TEACHER = "teacher.pth"
# Settings that may differ when resuming without changing the training itself.
RUNTIME_FIELDS = frozenset({"data_dir", "output_dir", "resume", "resume_from", "num_workers", "device",
                            "progress", "save_every", "epochs", "precision"})


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
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write ``checkpoint-last.pth`` (and ``checkpoint-<epoch>.pth``), then ``teacher.pth``.

    In that order, a kill between the two leaves ``teacher.pth`` one epoch behind, never ahead; a
    resume rewrites it from the checkpoint. The optimizer must have been built by
    ``train.build_optimizer`` (MOCA's parameter order).
    """
    ckpt = {"model": official.to_official(model.state_dict(), kappa=cfg.kappa),
            "optimizer": optimizer.state_dict(), "epoch": epoch,
            "args": official.official_args(cfg, world_size=world_size)}
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
        save_atomic(ckpt, run_dir / f"checkpoint-{epoch}.pth")
    save_atomic(ckpt, run_dir / CHECKPOINT)
    save_teacher(run_dir / TEACHER, model)
    return run_dir / CHECKPOINT


def saved_settings(ckpt: dict[str, Any], *, path: Path) -> dict[str, Any]:
    """The ``PretrainConfig`` fields a checkpoint's ``args`` fixes (MOCA's names translated)."""
    args = ckpt.get("args")
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path}: no argparse.Namespace 'args' (not a MOCA training checkpoint?)")
    return official.config_from_args(args, source=str(path))


def _effective(values: dict[str, Any]) -> dict[str, Any]:
    """Settings as the training sees them: absolute lr (not blr), the generators' lr."""
    out = dict(values)
    if out.get("lr") is None and "blr" in out:
        out["lr"] = out["blr"] * out["batch_size"] / 256
    if out.get("lr_prototypes", 0.0) is None:
        out["lr_prototypes"] = out["lr"]
    out.pop("blr", None)
    return out


def check_same_training(saved: dict[str, Any], cfg: PretrainConfig, *, path: Path) -> None:
    """Refuse to resume with settings that change the training (runtime fields may differ)."""
    mine, saved = _effective(cfg.to_dict()), _effective(saved)
    changed = [f"{k} {v!r} -> {mine[k]!r}" for k, v in saved.items()
               if k in mine and k not in RUNTIME_FIELDS and _differs(v, mine[k])]
    if changed:
        raise ConfigError(f"{path}: cannot resume with different settings: {'; '.join(changed[:4])}")
    if saved.get("epochs", cfg.epochs) != cfg.epochs:
        log.warning("resuming with epochs %d (was %d): the lr and momentum schedules change",
                    cfg.epochs, saved["epochs"])


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) > 1e-12 * max(1.0, abs(a))
    return a != b


def load_for_resume(run_dir: Path, cfg: PretrainConfig, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore model, optimizer (and fp16 scaler) from ``cfg.resume_from`` or
    ``run_dir/checkpoint-last.pth`` (ours or MOCA's); return the next epoch."""
    path = Path(cfg.resume_from) if cfg.resume_from else run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{path}: nothing to resume (no checkpoint); drop --resume to start anew")
    ckpt = dict(read_checkpoint(path))
    check_same_training(saved_settings(ckpt, path=path), cfg, path=path)
    state = official.from_official(ckpt.get("model", {}), expected=model.state_dict().keys(),
                                   source=str(path))
    try:
        model.load_state_dict(state, strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not match this model/optimizer: {first}") from None
    log.info("resumed from %s (epoch %d finished)", path, ckpt["epoch"])
    return int(ckpt["epoch"]) + 1
