"""Linear probing on a frozen backbone: a grid of heads trained from ONE backbone pass per batch.

Paper mode (``augmented``, MOCA Table 12 / iBOT): RandomResizedCrop + flip each epoch, SGD
(momentum 0.9, no weight decay), per-step cosine schedule, lr = base x global batch / 256.
Fast mode (``cached``): the same heads on cached center-crop features (``extract_splits``).

Every head of the grid (feature variant x base lr) is its own ``nn.Linear`` and its own SGD param
group; the forward concatenates the heads of a feature into one matmul and the loss is the sum of
the heads' cross-entropies, so the grid trains each head exactly as if it were trained alone.
Selection is honest by default: the reported head is the best on a stratified held-out 10% of the
training set (never trained on); ``select_on='val'`` reproduces papers that selected on val.
Held-out and val images are always scored on center-crop features from the feature cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from moca_eval import outputs, runtime
from moca_eval.checkpoints import LoadedBackbone
from moca_eval.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderIndex, eval_transform
from moca_eval.errors import ConfigError
from moca_eval.families import resolve_recipe
from moca_eval.features import (
    FeatureSet,
    check_feature_name,
    compute_features,
    extract_features,
    features_for_depth,
)
from moca_eval.pipeline import FeatureJob, dataset_info, extract_splits, transform_info
from moca_eval.protocols import training
from moca_eval.protocols.linear_heads import GridSGD, HeadGrid, grid_loss, head_accuracy
from moca_eval.record import Clock, Record, checkpoint_block, metrics_block, recipe_block
from moca_eval.registry import Registry

log = logging.getLogger(__name__)

Mode = Literal["augmented", "cached"]
SelectOn = Literal["holdout", "val"]
# MOCA/iBOT's sweep: {1..9} x 10^{-4..0}, base values scaled by global batch / 256.
LR_GRID: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-4, 1) for m in range(1, 10))
DEFAULT_FEATURES = ("cls", "avg", "cls+avg")
LARS_TRUST = 1e-3  # MAE util/lars.py trust_coefficient
DECODE_RECORD = "decodable-train.json"  # in the run directory: which training images decode


@dataclass(frozen=True)
class LinearRecipe:
    """One project's published linear-probe settings (``lr_grid=()``: a single head at ``blr``).

    All use SGD without weight decay (``GridSGD``); ``optimizer="lars"`` adds MAE's LARS trust
    ratio (coefficient ``LARS_TRUST``) on the head weights."""

    name: str
    description: str
    blr: float = 0.04
    lr_grid: tuple[float, ...] = LR_GRID
    features: tuple[str, ...] = DEFAULT_FEATURES
    epochs: int = 100
    warmup_epochs: float = 0.0
    batch_size: int = 1024  # global batch
    momentum: float = 0.9
    head_norm: Literal["none", "bn"] = "none"  # bn: BatchNorm without affine before the head (MAE)
    interpolation: str = "bilinear"  # of RandomResizedCrop
    init_std: float = 0.01
    optimizer: Literal["sgd", "lars"] = "sgd"

    @property
    def head_lrs(self) -> tuple[float, ...]:
        return self.lr_grid or (self.blr,)


LINEAR_RECIPES: Registry[LinearRecipe] = Registry("linear recipe")
for _r in (
    LinearRecipe("moca", "MOCA paper Table 12 (iBOT protocol): SGD 0.9, blr 0.04, batch 1024, 100 ep"),
    LinearRecipe("ibot", "iBOT eval_linear(_multi): SGD 0.9, blr 1e-3, batch 1024, 100 ep", blr=1e-3),
    LinearRecipe("dino", "DINO eval_linear: SGD 0.9, blr 1e-3, batch 1024, 100 ep; adds cls-last4",
                 blr=1e-3, features=("cls", "avg", "cls+avg", "cls-last4")),
    LinearRecipe("mae", "MAE main_linprobe: LARS (trust 1e-3), BatchNorm (no affine) before the head, "
                 "blr 0.1, batch 16384, 90 ep, 10 warm-up, bicubic crops", blr=0.1, batch_size=16384,
                 epochs=90, warmup_epochs=10, head_norm="bn", interpolation="bicubic", optimizer="lars"),
    *(LinearRecipe(name, f"{who}: no linear recipe in PROTOCOLS.md; generic = the MOCA paper's (iBOT "
                   "protocol): SGD 0.9, blr 0.04, batch 1024, 100 ep, lr grid, held-out selection")
      for name, who in (("msn", "MSN"), ("mocov3", "MoCo-v3"), ("dinov2", "DINOv2"),
                        ("timm", "timm/unknown (generic fallback)"))),
):
    LINEAR_RECIPES.register(_r.name, _r)


def linear_recipe(name: str = "moca", **overrides: Any) -> LinearRecipe:
    """A named recipe with the given fields replaced (``None`` values are ignored)."""
    recipe = LINEAR_RECIPES.get(name)
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class LinearConfig:
    """A linear-probe run. ``output_dir=None``: no checkpoints or log (quick runs)."""

    job: FeatureJob
    recipe: LinearRecipe | str | None = None  # None: the checkpoint family's; a name: that recipe
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe fields to replace
    mode: Mode = "augmented"
    select_on: SelectOn = "holdout"
    holdout_fraction: float = 0.1
    output_dir: Path | None = None
    resume: bool = False
    eval_every: int = 0  # also score the heads every N epochs (0: at the end only)
    micro_batch: int | None = None  # per process; None: job.extract.batch_size (augmented), no accum (cached)
    seed: int = 0


@dataclass(frozen=True)
class HeadScore:
    feature: str
    base_lr: float
    lr: float
    val_top1: float
    val_top5: float
    holdout_top1: float | None = None


@dataclass
class LinearResult:
    selected: HeadScore
    heads: list[HeadScore]
    mode: str
    select_on: str
    n_train: int
    n_holdout: int
    n_val: int
    record: Record

    def to_dict(self) -> dict:
        return self.record.to_dict()


def holdout_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train_rows, held_rows)``: ``round(fraction * n_c)`` images of each class held
    out (at least one when the class has two or more), chosen by a seeded permutation."""
    labels = np.asarray(labels)
    if fraction <= 0:
        return np.arange(len(labels)), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(runtime.derive_seed(seed, 4))
    held = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        take = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.append(rng.permutation(rows)[:take])
    held_rows = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_rows), held_rows


# ----------------------------------------------------------------------------- data
@dataclass
class ProbeData:
    """The training pool, and center-crop features of the held-out and val images."""

    train_rows: np.ndarray  # rows of ``train_feats`` (cached) or of ``index`` (augmented)
    train_labels: torch.Tensor  # labels of everything ``train_rows`` indexes into
    train_feats: dict[str, torch.Tensor] | None
    index: ImageFolderIndex | None
    holdout: FeatureSet | None
    val: FeatureSet
    num_classes: int
    dims: dict[str, int]
    train_skipped: list[str] = field(default_factory=list)  # undecodable training images


def _tensors(fs: FeatureSet, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(fs.features[n]) for n in names}


def _subset(fs: FeatureSet, rows: np.ndarray) -> FeatureSet:
    return FeatureSet({n: v[rows] for n, v in fs.features.items()}, fs.labels[rows],
                      [fs.paths[i] for i in rows], fs.classes)


def prepare_data(cfg: LinearConfig, backbone: LoadedBackbone, names: Sequence[str],
                 splits: tuple[ImageFolderIndex, ImageFolderIndex]) -> ProbeData:
    """Cached features (``cached``) or the image index (``augmented``), and the held-out split."""
    fraction = cfg.holdout_fraction if cfg.select_on == "holdout" else 0.0
    if cfg.mode == "cached":
        train, val = extract_splits(cfg.job, names, backbone, splits)
        rows, held = holdout_split(train.labels, fraction, seed=cfg.seed)
        holdout = _subset(train, held) if len(held) else None
        return ProbeData(rows, torch.from_numpy(train.labels), _tensors(train, names), None, holdout, val,
                         len(train.classes), {n: train.features[n].shape[1] for n in names}, train.skipped)
    train_index, val_index = splits
    train_index, skipped = training.drop_undecodable(
        train_index, num_workers=cfg.job.extract.num_workers, strict=cfg.job.extract.strict,
        record=cfg.output_dir / DECODE_RECORD if cfg.output_dir else None)
    transform = eval_transform(backbone.arch.img_size, resize=cfg.job.data.resize,
                               interpolation=cfg.job.data.interpolation or "bicubic")
    rows, held = holdout_split(np.asarray(train_index.labels), fraction, seed=cfg.seed)
    holdout = extract_features(backbone, train_index.subset(held), names, cfg.job.extract,
                               transform=transform) if len(held) else None
    val = extract_features(backbone, val_index, names, cfg.job.extract, transform=transform)
    return ProbeData(rows, torch.as_tensor(train_index.labels), None, train_index, holdout, val,
                     len(train_index.classes), {n: val.features[n].shape[1] for n in names}, skipped)


def train_augmentation(img_size: int, interpolation: str) -> Any:
    """RandomResizedCrop + horizontal flip + ImageNet normalisation (DINO/iBOT/MAE linear)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode(interpolation)),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ----------------------------------------------------------------------------- training
@dataclass
class _Run:
    cfg: LinearConfig
    rt: runtime.Runtime
    data: ProbeData
    backbone: LoadedBackbone
    plan: runtime.BatchPlan
    names: tuple[str, ...]
    steps: int

    def epoch_steps(self, epoch: int) -> Iterator[list[tuple[dict[str, torch.Tensor], torch.Tensor]]]:
        """Per optimizer step, this process's micro-batches as ``(features, labels)`` on the device."""
        batches = training.epoch_batches(self.data.train_rows, self.plan, seed=self.cfg.seed,
                                         epoch=epoch, rank=self.rt.dist.rank)
        dev, labels = self.rt.device, self.data.train_labels
        if self.data.train_feats is not None:
            for step in batches:
                yield [({n: self.data.train_feats[n][mb].to(dev) for n in self.names}, labels[mb].to(dev))
                       for mb in step]
            return
        augment = train_augmentation(self.backbone.arch.img_size, self.cfg.recipe.interpolation)
        dataset = training.SeededImageDataset(self.data.index, augment, seed=self.cfg.seed)
        loader = training.image_loader(dataset, [mb for step in batches for mb in step], epoch=epoch,
                                       num_workers=self.cfg.job.extract.num_workers, rt=self.rt)
        for step in training.grouped(loader, self.plan.accum):
            out = []
            for images, rows, _bad in step:
                if len(rows) == 0:
                    continue
                with self.rt.autocast():
                    feats = compute_features(self.backbone.model, images.to(dev, non_blocking=True),
                                             self.names)
                out.append((feats, labels[rows].to(dev)))
            yield out

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, sched: training.Schedule,
                    epoch: int) -> dict[str, float]:
        """One epoch of SGD on every head; returns the mean per-head loss and the largest lr."""
        model.train()
        total, lr = torch.zeros((), dtype=torch.float64, device=self.rt.device), 0.0
        bar = training.progress(self.epoch_steps(epoch), total=self.steps, desc=f"linear epoch {epoch}",
                                rt=self.rt)
        for step, micro in enumerate(bar):
            lr = training.apply_lr(optimizer, epoch * self.steps + step, sched)
            for i, (feats, labels) in enumerate(micro):
                with runtime.sync_grads(model, i == len(micro) - 1):
                    loss = grid_loss(model(feats), labels, self.plan.local_batch)
                    loss.backward()
                total += loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        heads = len(runtime.unwrap(model).names)
        loss = runtime.all_reduce_sum(total).item() / (self.steps * heads * self.plan.world_size)
        return {"loss": loss, "lr_max": lr}


def score_heads(grid: HeadGrid, data: ProbeData, *, select_on: SelectOn, lr_scale: float,
                device: torch.device) -> tuple[list[HeadScore], int]:
    """Every head's val (and held-out) accuracy, and the index of the selected head."""
    v1, v5 = head_accuracy(grid, _tensors(data.val, grid.features), torch.from_numpy(data.val.labels),
                           device=device)
    h1 = None
    if data.holdout is not None:
        h1, _ = head_accuracy(grid, _tensors(data.holdout, grid.features),
                              torch.from_numpy(data.holdout.labels), device=device)
    heads = [HeadScore(f, lr, lr * lr_scale, float(v1[i]), float(v5[i]), None if h1 is None else float(h1[i]))
             for i, (f, lr) in enumerate(grid.names)]
    key = h1 if select_on == "holdout" and h1 is not None else v1
    best = max(range(len(heads)), key=lambda i: (key[i], -i))
    return heads, best


def _check(cfg: LinearConfig) -> None:
    if cfg.mode not in ("augmented", "cached"):
        raise ConfigError(f"unknown linear mode {cfg.mode!r}; use augmented or cached")
    if cfg.select_on not in ("holdout", "val"):
        raise ConfigError(f"unknown --select-on {cfg.select_on!r}; use holdout or val")
    if cfg.select_on == "holdout" and not 0 < cfg.holdout_fraction < 1:
        raise ConfigError(f"held-out fraction must be in (0, 1), got {cfg.holdout_fraction}")
    if isinstance(cfg.recipe, str):
        LINEAR_RECIPES.canonical(cfg.recipe)


def _check_recipe(cfg: LinearConfig) -> None:
    if cfg.recipe.optimizer not in ("sgd", "lars"):
        raise ConfigError(f"unknown linear optimizer {cfg.recipe.optimizer!r}; use sgd or lars")
    if cfg.recipe.epochs < 1 or min(cfg.recipe.head_lrs) <= 0:
        raise ConfigError("epochs must be >= 1 and learning rates > 0")


def _fingerprint(cfg: LinearConfig, backbone: LoadedBackbone, data: ProbeData, precision: str) -> dict:
    """The settings a resumed run must share (not the process count or micro-batch)."""
    d = cfg.job.data
    return runtime.jsonable({
        "protocol": "linear", "mode": cfg.mode, "select_on": cfg.select_on,
        "holdout_fraction": cfg.holdout_fraction, "seed": cfg.seed, "recipe": asdict(cfg.recipe),
        "checkpoint_sha256": backbone.sha256, "student": backbone.student, "arch": repr(backbone.arch),
        "data": [str(d.root), d.train_split, d.val_split, d.resize, d.interpolation],
        "n_train": len(data.train_rows), "num_classes": data.num_classes, "precision": precision,
    })


def run(cfg: LinearConfig) -> LinearResult:
    """Train the head grid (resuming if asked), score every head, select one."""
    _check(cfg)
    clock = Clock()
    splits = cfg.job.data.splits()
    rt = runtime.make_runtime(cfg.job.extract.device, cfg.job.extract.resolved_precision())
    backbone = cfg.job.backbone.load()
    recipe, why = resolve_recipe(LINEAR_RECIPES, "linear", backbone, cfg.recipe, cfg.overrides)
    cfg = replace(cfg, recipe=recipe)
    _check_recipe(cfg)
    names = features_for_depth([check_feature_name(n) for n in dict.fromkeys(recipe.features)],
                               backbone.arch.depth, requested=bool(cfg.overrides.get("features")))
    if cfg.output_dir is not None:
        outputs.claim_run_dir(cfg.output_dir, "linear", own_files=runtime.RUN_FILES)
    micro = cfg.micro_batch or (cfg.job.extract.batch_size if cfg.mode == "augmented" else None)
    plan = runtime.make_plan(recipe.batch_size, micro, rt.dist.world_size)
    training.steps_per_epoch(len(splits[0]), plan)  # the batch fits the data: checked before extraction
    data = prepare_data(cfg, backbone, names, splits)
    steps = training.steps_per_epoch(len(data.train_rows), plan)
    torch.manual_seed(runtime.derive_seed(cfg.seed, 5))
    grid = HeadGrid(data.dims, recipe.head_lrs, data.num_classes, batch_norm=recipe.head_norm == "bn",
                    init_std=recipe.init_std).to(rt.device)
    lr_scale = recipe.batch_size / 256
    optimizer = GridSGD(grid.param_groups(lr_scale), lr=recipe.blr * lr_scale, momentum=recipe.momentum,
                        trust_coefficient=LARS_TRUST if recipe.optimizer == "lars" else None)
    sched = training.Schedule(recipe.epochs * steps, round(recipe.warmup_epochs * steps))
    fingerprint = _fingerprint(cfg, backbone, data, rt.precision)
    state = runtime.resume_from(cfg.output_dir, resume=cfg.resume, config=fingerprint)
    start = 0
    if state is not None:
        grid.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
    logbook = runtime.JsonlLog(cfg.output_dir / runtime.LOG_NAME if cfg.output_dir else None)
    logbook.truncate(start)
    if cfg.mode == "augmented":
        backbone.model.to(rt.device).eval().requires_grad_(False)
    job = _Run(cfg, rt, data, backbone, plan, names, steps)
    model = runtime.wrap_ddp(grid, rt)
    for epoch in range(start, recipe.epochs):
        tic = time.time()
        record: dict[str, Any] = {"epoch": epoch, **job.train_epoch(model, optimizer, sched, epoch)}
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            heads, best = score_heads(grid, data, select_on=cfg.select_on, lr_scale=lr_scale,
                                      device=rt.device)
            record.update(selected=f"{heads[best].feature}@{heads[best].base_lr:g}",
                          val_top1=heads[best].val_top1, holdout_top1=heads[best].holdout_top1)
        logbook.write({**record, "time_s": round(time.time() - tic, 3)})
        if cfg.output_dir is not None:
            runtime.save_checkpoint(cfg.output_dir / runtime.CHECKPOINT_NAME, {
                "epoch": epoch + 1, "heads": grid.state_dict(), "optimizer": optimizer.state_dict(),
                "config": fingerprint})
    heads, best = score_heads(grid, data, select_on=cfg.select_on, lr_scale=lr_scale, device=rt.device)
    n_hold = 0 if data.holdout is None else len(data.holdout)
    sel = heads[best]
    skipped = data.train_skipped + data.val.skipped + (data.holdout.skipped if data.holdout else [])
    result_record = Record(
        "linear", checkpoint_block(backbone), dataset_info(cfg.job, splits, skipped=skipped),
        {"recipe": recipe_block(recipe.name, runtime.jsonable(asdict(recipe)), why=why),
         "mode": cfg.mode, "select_on": cfg.select_on, "holdout_fraction": cfg.holdout_fraction,
         "global_batch": plan.global_batch, "micro_batch": plan.micro_batch, "accum": plan.accum,
         "world_size": plan.world_size, "steps_per_epoch": steps, "lr_scale": lr_scale,
         "precision": rt.precision, **transform_info(cfg.job, backbone.arch.img_size), "seed": cfg.seed,
         "resumed_from_epoch": start, "n_train": len(data.train_rows), "n_holdout": n_hold,
         "n_val": len(data.val)},
        metrics_block("top1 (selected head)", sel.val_top1,
                      values={"top1": sel.val_top1, "top5": sel.val_top5,
                              "holdout_top1": sel.holdout_top1, "selected": asdict(sel)},
                      rows=[asdict(h) for h in heads]),
        clock.provenance())
    return LinearResult(sel, heads, cfg.mode, cfg.select_on, len(data.train_rows), n_hold,
                        len(data.val), result_record)
