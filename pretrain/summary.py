"""Pretraining's result record: the teacher it wrote, the images it saw, its per-epoch losses."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moca_eval.checkpoints import load_backbone
from moca_eval.data import ImageFolderIndex
from moca_eval.pretrain.checkpoint import RUNTIME_FIELDS
from moca_eval.pretrain.config import PRESETS, PretrainConfig
from moca_eval.pretrain.data import find_images, image_root
from moca_eval.record import Clock, Record, checkpoint_block, dataset_block, metrics_block, recipe_block
from moca_eval.runtime import JsonlLog, Runtime

if TYPE_CHECKING:
    from moca_eval.pretrain.train import PretrainResult

LAST_EPOCH_VALUES = ("loss", "loss_img", "loss_loc", "codebook_usage", "tau", "imgs_per_s")


def closest_preset(cfg: PretrainConfig) -> tuple[str, list[str]]:
    """The preset ``cfg`` was most likely made from, and the training settings it changes."""
    mine = cfg.to_dict()
    diffs = {name: [f.name for f in fields(PretrainConfig) if f.name not in RUNTIME_FIELDS
                    and base.to_dict()[f.name] != mine[f.name]]
             for name, base in PRESETS.items()}
    name = min(diffs, key=lambda n: len(diffs[n]))
    return name, diffs[name]


def training_time(log_file: Path, batch_size: int) -> float:
    """Seconds of training over every logged step (a resumed run's earlier steps included; data
    loading included, checkpoint writing not): each step logs ``batch / its own duration``."""
    return round(sum(batch_size / r["imgs_per_s"] for r in JsonlLog(log_file).records()), 3)


def pretrain_record(cfg: PretrainConfig, result: PretrainResult, *, rt: Runtime, clock: Clock) -> Record:
    """The record of a finished run; its checkpoint is the teacher, read back by the core loader."""
    teacher = load_backbone(result.teacher, img_size=cfg.img_size, family="moca")
    block = checkpoint_block(teacher)
    block.update(family_source="trained", family_reason="written by moca-eval pretrain")
    images = find_images(cfg.data_dir)
    index = ImageFolderIndex(image_root(cfg.data_dir), [], [(path, 0) for path in images])
    preset, changed = closest_preset(cfg)
    why = f"preset {preset}" + (f" with {', '.join(changed)} changed" if changed else "")
    last = result.history[-1] if result.history else {}
    values: dict[str, Any] = {k: last[k] for k in LAST_EPOCH_VALUES if k in last}
    values.update(epochs_done=result.epochs_done, world_size=rt.dist.world_size,
                  train_time_s=training_time(result.log_file, cfg.batch_size))
    config = {**cfg.to_dict(), "precision": rt.precision, "world_size": rt.dist.world_size,
              "run_dir": str(result.output_dir), "recipe": recipe_block(preset, cfg.to_dict(), why=why)}
    return Record(
        protocol="pretrain",
        checkpoint=block,
        dataset=dataset_block(cfg.data_dir, splits={"train": index}, n_classes=0, skipped=result.skipped),
        config=config,
        metrics=metrics_block("loss", last.get("loss"), values=values, rows=result.history),
        provenance=clock.provenance(),
    )
