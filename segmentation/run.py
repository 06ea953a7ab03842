"""Cityscapes semantic segmentation (Segmenter on mmseg): linear probe or fine-tuning, any checkpoint.

One mmengine run per training split (French et al. 100/372 splits x seeds, or the full 2975),
each in its own work directory with its split file, mmengine checkpoints (``resume``) and a
``result.json``; a finished split is not run again. Returns mIoU, aAcc, mAcc and per-class IoU
per split and their mean +- std (population std, as for low-shot).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from moca_eval import outputs
from moca_eval.errors import ConfigError
from moca_eval.families import SHARED_RECIPES, announce, recipe_name
from moca_eval.mm_utils import as_backbone_config
from moca_eval.pipeline import BackboneConfig, check_limit, limit_count
from moca_eval.record import (
    Clock,
    Record,
    checkpoint_block,
    dataset_block,
    metrics_block,
    recipe_block,
    split_summary,
)
from moca_eval.runtime import fingerprint, make_plan, read_finished, write_finished
from moca_eval.segmentation import cityscapes as cs

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
Mode = Literal["linear", "finetune"]
# PROTOCOLS.md: linear low-shot 100 epochs per split, fine-tuning and the full set 216 epochs.
LOWSHOT_LINEAR_EPOCHS = 100
DEFAULT_EPOCHS = 216
# What seg writes in its run directory (a split folder first): see ``outputs.claim_run_dir``.
RUN_FILES = ("*-*", "results.json", "results.png")


@dataclass(frozen=True)
class SegConfig:
    """One ``moca-eval seg`` run (defaults: PROTOCOLS.md's Segmenter Cityscapes recipe)."""

    backbone: BackboneConfig  # which weights (a checkpoint path is accepted too)
    data: Path
    mode: Mode = "linear"
    train_size: str = "100"  # "100", "372" or "full"
    split_seeds: tuple[int, ...] = cs.SPLIT_SEEDS
    names_file: Path | None = None  # a custom list of train images instead of French splits
    lr: float = 0.01
    epochs: float | None = None  # None: 100 (linear, low-shot) or 216
    iters: int | None = None  # overrides epochs
    batch_size: int = 8  # global, over all processes
    crop_size: int = 768
    stride: int | None = None  # sliding-window stride; None: 2/3 of the crop (Segmenter: 512 for 768)
    resize_scale: tuple[int, int] = (2048, 1024)  # (long, short) side before the 0.5-2.0 jitter
    layer_decay: float | None = None  # fine-tuning only
    work_dir: Path = Path("runs/seg")
    resume: bool = False
    num_workers: int = 4
    save_every: int = 2000  # iterations between mmengine checkpoints
    save_predictions: bool = False  # val predictions as PNG (trainIds) per split
    seed: int = 0  # training randomness (the split seeds choose the images)
    limit: float | None = None  # smoke runs: the first N images (or a fraction) of each split and of val

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone", as_backbone_config(self.backbone))
        if self.stride is None:
            object.__setattr__(self, "stride", max(1, round(self.crop_size * 2 / 3)))

    def validate(self) -> SegConfig:
        check_limit(self.limit, "images")
        if self.mode not in ("linear", "finetune"):
            raise ConfigError(f"unknown mode {self.mode!r} (linear or finetune)")
        if self.train_size not in cs.TRAIN_SIZES:
            raise ConfigError(f"unknown train size {self.train_size!r} ({', '.join(cs.TRAIN_SIZES)})")
        if self.layer_decay is not None and self.mode != "finetune":
            raise ConfigError("--layer-decay applies to fine-tuning only (the linear probe is frozen)")
        for name in ("batch_size", "crop_size", "stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stride > self.crop_size:
            raise ConfigError(f"stride {self.stride} exceeds crop size {self.crop_size}: the sliding "
                              "windows would leave pixels unpredicted; use a stride <= the crop "
                              "(default 2/3 of it)")
        if self.iters is not None and self.iters < 1 or self.epochs is not None and self.epochs <= 0:
            raise ConfigError("iters and epochs must be positive")
        return self

    def resolved_epochs(self) -> float:
        if self.epochs is not None:
            return self.epochs
        lowshot = self.train_size != "full" or self.names_file is not None
        return LOWSHOT_LINEAR_EPOCHS if self.mode == "linear" and lowshot else DEFAULT_EPOCHS

    def iterations(self, n_train: int) -> int:
        return self.iters or max(1, math.ceil(self.resolved_epochs() * n_train / self.batch_size))


@dataclass
class SplitScore:
    """The evaluation of one trained split."""

    split: str  # "100-seed12345", "full", "custom"
    seed: int | None
    n_train: int
    names_sha256: str
    iters: int
    miou: float
    aacc: float
    macc: float
    per_class_iou: dict[str, float]
    work_dir: str


@dataclass
class SegResult:
    mode: str
    train_size: str
    splits: list[SplitScore]
    miou_mean: float
    miou_std: float
    per_class_mean: dict[str, float]
    record: Record

    def to_dict(self) -> dict:
        return self.record.to_dict()


def names_sha256(names: list[str]) -> str:
    return hashlib.sha256("".join(n + "\n" for n in names).encode()).hexdigest()


def training_splits(cfg: SegConfig) -> list[tuple[str, int | None, list[str]]]:
    """``(tag, seed, names)`` of every split to train on (checks the layout first); with
    ``cfg.limit``, the first images of each split's names."""
    return [(tag, seed, _limited(names, cfg.limit)) for tag, seed, names in _chosen_splits(cfg)]


def val_names(cfg: SegConfig) -> list[str]:
    """The val images evaluated: all of them in sorted order, or the first ``cfg.limit``."""
    return _limited([cs.image_stem(image) for image, _ in cs.list_pairs(cfg.data, "val")], cfg.limit)


def _limited(names: list[str], limit: float | None) -> list[str]:
    return names if limit is None else names[:limit_count(limit, len(names))]


def _chosen_splits(cfg: SegConfig) -> list[tuple[str, int | None, list[str]]]:
    cs.list_pairs(cfg.data, "train")
    cs.list_pairs(cfg.data, "val")
    names = cs.train_names(cfg.data)
    if cfg.names_file is not None:
        chosen = cs.read_names(cfg.names_file)
        cs.check_names_known(chosen, names, cfg.names_file)
        return [("custom", None, chosen)]
    size = cs.TRAIN_SIZES[cfg.train_size]
    if len(names) != cs.FULL_TRAIN_COUNT:
        log.warning("%s has %d train images, not Cityscapes' %d: the French et al. splits are only "
                    "the published ones on the real train set", cfg.data, len(names), cs.FULL_TRAIN_COUNT)
    if size is None:
        return [("full", None, names)]
    return [(f"{size}-seed{seed}", seed, cs.french_split(names, size, seed)) for seed in cfg.split_seeds]


def mm_config(cfg: SegConfig, *, embed_dim: int, num_heads: int, split_file: Path, iters: int,
              work_dir: Path, world_size: int, val_file: Path | None = None):
    """The mmengine ``Config`` of one split: the mode's config file with this run's values
    (``val_file``: evaluate only the val images it lists, one stem per line)."""
    from mmengine.config import Config

    from moca_eval.mm_utils import set_device_options

    c = Config.fromfile(str(CONFIG_DIR / f"segmenter_{cfg.mode}.py"))
    crop = (cfg.crop_size, cfg.crop_size)
    c.work_dir = str(work_dir)
    c.experiment_name = f"{work_dir.name}_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    c.resume = cfg.resume
    c.randomness = dict(seed=cfg.seed)
    c.launcher = "pytorch" if world_size > 1 else "none"
    c.data_preprocessor.size = crop
    m = c.model
    m.data_preprocessor.size = crop
    m.backbone.update(checkpoint=cfg.backbone.to_dict(), img_size=cfg.crop_size)
    m.decode_head.update(in_channels=embed_dim, channels=embed_dim)
    if cfg.mode == "finetune":
        m.decode_head.update(embed_dims=embed_dim, num_heads=num_heads)
    m.test_cfg.update(crop_size=crop, stride=(cfg.stride, cfg.stride))
    for step in c.train_dataloader.dataset.pipeline:
        if step.type == "RandomResize":
            step.scale = cfg.resize_scale
        elif step.type == "RandomCrop":
            step.crop_size = crop
    for step in c.val_dataloader.dataset.pipeline:
        if step.type == "Resize":
            step.scale = cfg.resize_scale
    for loader in (c.train_dataloader, c.val_dataloader, c.test_dataloader):
        loader.dataset.data_root = str(cfg.data)
        loader.num_workers = cfg.num_workers
        loader.persistent_workers = cfg.num_workers > 0
    c.train_dataloader.dataset.ann_file = str(split_file)
    if val_file is not None:
        for loader in (c.val_dataloader, c.test_dataloader):
            loader.dataset.ann_file = str(val_file)
    c.train_dataloader.batch_size = make_plan(cfg.batch_size, None, world_size).local_batch
    if cfg.save_predictions:
        c.val_evaluator.output_dir = str(work_dir / "predictions")
    c.optim_wrapper.optimizer.lr = cfg.lr
    if cfg.layer_decay is not None:
        c.optim_wrapper.constructor = "ViTLayerDecayOptimizerConstructor"
        c.optim_wrapper.paramwise_cfg = dict(layer_decay=cfg.layer_decay)
    set_device_options(c)
    c.param_scheduler[0].end = iters
    # evaluated once, by run() after training (mmengine's loop also validates at its last iteration
    # unless val_begin lies beyond it)
    c.train_cfg.update(max_iters=iters, val_interval=iters + 1, val_begin=iters + 1)
    c.default_hooks.checkpoint.interval = min(cfg.save_every, iters)
    c.default_hooks.logger.interval = max(1, min(50, iters // 10))
    return c


def train_and_evaluate(c) -> dict[str, float]:
    """Run mmengine's training loop (resuming when ``c.resume``) then the val loop."""
    from mmengine.runner import Runner

    from moca_eval.mm_utils import mmengine_checkpoints, one_line_dataset_errors

    runner = Runner.from_cfg(c)
    with mmengine_checkpoints(), one_line_dataset_errors():
        runner.train()
        return runner.val()


def run(cfg: SegConfig) -> SegResult:
    """Train and evaluate every split of ``cfg``; see the module docstring."""
    from mmengine.dist import get_world_size

    from moca_eval.mm_utils import join_cpu_process_group

    cfg = cfg.validate()
    clock = Clock()
    splits = training_splits(cfg)
    evaluated = val_names(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    make_plan(cfg.batch_size, None, world_size)  # the global batch must split evenly, before loading
    backbone = cfg.backbone.load(img_size=cfg.crop_size)
    announce("seg", backbone.family_choice, *recipe_name("seg", backbone.family))
    outputs.claim_run_dir(cfg.work_dir, "seg", own_files=RUN_FILES)
    join_cpu_process_group()
    scores = []
    for tag, seed, names in splits:
        work_dir = cfg.work_dir / f"{cfg.mode}-{tag}"
        done = work_dir / "result.json"
        iters = cfg.iterations(len(names))
        digest = names_sha256(names)
        key = split_fingerprint(cfg, names_digest=digest, iters=iters, ckpt_sha=backbone.sha256)
        previous = read_finished(done, key)
        if previous is not None:
            log.info("%s: already evaluated, reusing %s", tag, done)
            scores.append(SplitScore(**previous))
            continue
        work_dir.mkdir(parents=True, exist_ok=True)
        split_file = work_dir / "train_split.txt"
        cs.write_names(split_file, names)
        val_file = None if cfg.limit is None else work_dir / "val_split.txt"
        if val_file is not None:
            cs.write_names(val_file, evaluated)
        c = mm_config(cfg, embed_dim=backbone.arch.embed_dim, num_heads=backbone.arch.num_heads,
                      split_file=split_file, iters=iters, work_dir=work_dir,
                      world_size=max(world_size, get_world_size()), val_file=val_file)
        metrics = train_and_evaluate(c)
        score = SplitScore(tag, seed, len(names), digest, iters, float(metrics["mIoU"]),
                           float(metrics["aAcc"]), float(metrics["mAcc"]),
                           {name: metrics[f"IoU.{name}"] for name in cs.CLASSES}, str(work_dir))
        write_finished(done, asdict(score), key)
        scores.append(score)
    mious = np.array([s.miou for s in scores])
    per_class = {name: _nanmean([s.per_class_iou[name] for s in scores]) for name in cs.CLASSES}
    train_size = cfg.train_size if cfg.names_file is None else "custom"
    record = Record("seg", checkpoint_block(backbone), _dataset(cfg, len(evaluated)),
                    _config(cfg, train_size, world_size),
                    metrics_block("mIoU (mean over splits)", float(mious.mean()),
                                  headline_std=float(mious.std()),
                                  values={"miou_mean": float(mious.mean()), "miou_std": float(mious.std()),
                                          "per_class_iou_mean": per_class},
                                  rows=[asdict(s) for s in scores],
                                  splits=[split_summary(f"{cfg.mode} {train_size}",
                                                        [s.miou for s in scores])]),
                    clock.provenance())
    return SegResult(cfg.mode, train_size, scores, float(mious.mean()), float(mious.std()), per_class, record)


def _dataset(cfg: SegConfig, n_val: int) -> dict:
    """train: the images the splits are drawn from (each split's own count is in its row);
    val: the images evaluated."""
    return dataset_block(cfg.data, splits={"train": len(cs.train_names(cfg.data)), "val": n_val},
                         n_classes=len(cs.CLASSES), name="cityscapes",
                         **({"limit": cfg.limit} if cfg.limit is not None else {}))


def _config(cfg: SegConfig, train_size: str, world_size: int) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k != "backbone"}
    settings.update(train_size=train_size, world_size=world_size, epochs=cfg.resolved_epochs())
    return {"recipe": recipe_block(SHARED_RECIPES["seg"], {k: settings[k] for k in RECIPE_FIELDS},
                                   why="seg uses one recipe for every family"), **settings}


# The Segmenter recipe's values (PROTOCOLS.md); the other fields say what to run and where.
RECIPE_FIELDS = ("lr", "batch_size", "crop_size", "stride", "resize_scale", "epochs", "layer_decay")


# Settings that do not change what a split's training computes.
RUNTIME_FIELDS = ("work_dir", "resume", "num_workers", "save_every", "save_predictions", "split_seeds",
                  "names_file")


def split_fingerprint(cfg: SegConfig, *, names_digest: str, iters: int, ckpt_sha: str) -> str:
    """What a split's result depends on: the training images, the checkpoint, every setting."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    settings["backbone"] = cfg.backbone.options()  # the path may move; the sha256 identifies it
    return fingerprint(settings, names_digest, iters, ckpt_sha)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")
