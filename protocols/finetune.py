"""End-to-end fine-tuning (MOCA paper Table 13: the BEiT/MAE recipe) from timm building blocks.

timm ``VisionTransformer`` (global average pooling + fc-norm, drop path), ``create_transform``
(RandAugment ``rand-m9-mstd0.5-inc1``, random erasing), ``Mixup`` (mixup/cutmix/label smoothing),
``create_optimizer_v2`` (AdamW with layer-wise lr decay and no weight decay on 1-D parameters and
``no_weight_decay()``: patch_embed/cls_token/pos_embed -> layer 0, block i -> i + 1, the rest ->
depth + 1, lr scale ``decay ** (depth + 1 - layer)``, MAE's ``param_groups_lrd`` rule).
Per-step warm-up + cosine schedule, gradient accumulation to the recipe's global batch, bf16
autocast on GPU, ``torchrun`` DDP, per-epoch atomic checkpoints that resume exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

from moca_eval import outputs, runtime
from moca_eval.checkpoints import LoadedBackbone
from moca_eval.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    ImageFolderIndex,
    collate_skip_bad,
    eval_transform,
)
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.families import resolve_recipe
from moca_eval.models import build_vit
from moca_eval.pipeline import FeatureJob, dataset_info, transform_info
from moca_eval.protocols import training
from moca_eval.protocols.knn import topk_correct
from moca_eval.record import Clock, Record, checkpoint_block, metrics_block, recipe_block
from moca_eval.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneRecipe:
    """One project's published fine-tuning settings (``batch_size`` is the global batch)."""

    name: str
    description: str
    blr: float = 1e-3  # lr = blr x batch_size / 256
    batch_size: int = 1024
    epochs: int = 100
    warmup_epochs: float = 5.0
    warmup_lr: float = 0.0
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float = 0.2
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fresh fc-norm
    head_init_std: float = 2e-5
    interpolation: str = "bicubic"


FINETUNE_RECIPES: Registry[FinetuneRecipe] = Registry("fine-tuning recipe")
for _r in (
    FinetuneRecipe("moca", "MOCA paper Table 13 (BEiT/MAE recipe): blr 1e-3, ld 0.65, drop path 0.2"),
    FinetuneRecipe("mae", "MAE ViT-B fine-tuning: blr 5e-4, ld 0.65, drop path 0.1", blr=5e-4, drop_path=0.1),
    FinetuneRecipe("ibot", "iBOT run_class_finetuning (ViT-B): lr 4e-3 at 1024, ld 0.65, 20 warm-up "
                   "epochs from 1e-6, drop path 0.1, CLS token", warmup_epochs=20, warmup_lr=1e-6,
                   drop_path=0.1, global_pool="token"),
    FinetuneRecipe("dino", "DINO published no fine-tuning recipe: iBOT's settings are used",
                   warmup_epochs=20, warmup_lr=1e-6, drop_path=0.1, global_pool="token"),
    *(FinetuneRecipe(name, f"{who}: no fine-tuning recipe in PROTOCOLS.md; generic = the MOCA paper's "
                     "(BEiT/MAE recipe, Table 13): blr 1e-3, ld 0.65, drop path 0.2, average pooling")
      for name, who in (("msn", "MSN"), ("mocov3", "MoCo-v3"), ("dinov2", "DINOv2"),
                        ("timm", "timm/unknown (generic fallback)"))),
):
    FINETUNE_RECIPES.register(_r.name, _r)


def finetune_recipe(name: str = "moca", **overrides: Any) -> FinetuneRecipe:
    """A named recipe with the given fields replaced (``None`` values are ignored)."""
    return replace(FINETUNE_RECIPES.get(name), **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run. ``output_dir=None``: no checkpoints or log."""

    job: FeatureJob
    recipe: FinetuneRecipe | str | None = None  # None: the checkpoint family's; a name: that recipe
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe fields to replace
    output_dir: Path | None = None
    resume: bool = False
    eval_every: int = 1  # evaluate on val every N epochs (and after the last)
    micro_batch: int | None = None  # per process; None: job.extract.batch_size
    seed: int = 0


@dataclass
class FinetuneResult:
    best_top1: float
    best_top5: float
    best_epoch: int
    last_top1: float
    last_top5: float
    history: list[dict]
    n_train: int
    n_val: int
    record: Record

    def to_dict(self) -> dict:
        return self.record.to_dict()


# ----------------------------------------------------------------------------- building blocks
def build_model(backbone: LoadedBackbone, num_classes: int, recipe: FinetuneRecipe) -> VisionTransformer:
    """timm ViT with the backbone's weights, a fresh head (std ``head_init_std``) and, for average
    pooling, a fresh fc-norm in place of the final norm (MAE deletes ``norm``)."""
    avg = recipe.global_pool == "avg"
    model = build_vit(backbone.arch, global_pool=recipe.global_pool, fc_norm=avg, num_classes=num_classes,
                      drop_path_rate=recipe.drop_path)
    weights = backbone.model.state_dict()
    if avg:
        weights = {k: v for k, v in weights.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    fresh = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if avg else set())
    if set(missing) != fresh or unexpected:
        raise CheckpointError(f"{backbone.path}: backbone does not fit the fine-tuning model (missing "
                              f"{sorted(set(missing) - fresh)[:5]}, unexpected {list(unexpected)[:5]})")
    trunc_normal_(model.head.weight, std=recipe.head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


def build_optimizer(model: nn.Module, recipe: FinetuneRecipe, lr: float) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups; every group peaks at ``lr * lr_scale``."""
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=recipe.weight_decay,
                                    layer_decay=recipe.layer_decay, betas=recipe.betas)
    for group in optimizer.param_groups:
        group["peak_lr"] = lr
    return optimizer


def train_transform(img_size: int, recipe: FinetuneRecipe) -> Any:
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment, random erasing.

    RandAugment's posterize can ask to keep 0 bits (magnitude 10, reached by ``mstd``); Pillow >= 11
    refuses that, older Pillow (which the published runs used) returned a black image. This
    transform's posterize ops are pointed at ``posterize_keep0``, which does the latter.
    """
    transform = create_transform(input_size=img_size, is_training=True, color_jitter=None,
                                 auto_augment=recipe.auto_augment, interpolation=recipe.interpolation,
                                 re_prob=recipe.reprob, re_mode="pixel", re_count=1,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_keep0
    return transform


def posterize_keep0(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with Pillow < 11 semantics: keeping 0 bits gives a black image."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep)


def make_mixup(recipe: FinetuneRecipe, num_classes: int) -> Mixup | None:
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0, switch_prob=0.5,
                 mode="batch", label_smoothing=recipe.smoothing, num_classes=num_classes)


def make_criterion(recipe: FinetuneRecipe, mixup: Mixup | None) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
    return nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- loops
@dataclass
class _Run:
    cfg: FinetuneConfig
    rt: runtime.Runtime
    plan: runtime.BatchPlan
    steps: int
    dataset: training.SeededImageDataset
    labels: torch.Tensor
    mixup: Mixup | None
    criterion: nn.Module

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, sched: training.Schedule,
                    epoch: int) -> dict[str, float]:
        model.train()
        rank, seed = self.rt.dist.rank, self.cfg.seed
        batches = training.epoch_batches(np.arange(len(self.labels)), self.plan, seed=seed, epoch=epoch,
                                         rank=rank)
        loader = training.image_loader(self.dataset, [mb for step in batches for mb in step], epoch=epoch,
                                       num_workers=self.cfg.job.extract.num_workers, rt=self.rt)
        steps = training.grouped(loader, self.plan.accum)
        total, lr = torch.zeros((), dtype=torch.float64, device=self.rt.device), 0.0
        for step, micro in enumerate(training.progress(steps, total=self.steps, desc=f"finetune epoch "
                                                       f"{epoch}", rt=self.rt)):
            lr = training.apply_lr(optimizer, epoch * self.steps + step, sched)
            micro = [m for m in micro if len(m[1])]  # a micro-batch with no decodable image
            for i, (images, rows, _bad) in enumerate(micro):
                training.seed_step(seed, epoch, step, i, rank)
                images = images.to(self.rt.device, non_blocking=True)
                targets = self.labels[rows].to(self.rt.device)
                if self.mixup is not None:
                    keep = len(images) - len(images) % 2  # timm's batch mixup pairs images
                    images, targets = self.mixup(images[:keep], targets[:keep])
                with runtime.sync_grads(model, i == len(micro) - 1):
                    with self.rt.autocast():
                        logits = model(images)
                    loss = self.criterion(logits.float(), targets) / self.plan.accum
                    loss.backward()
                total += loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = runtime.all_reduce_sum(total).item() / (self.steps * self.plan.world_size)
        return {"loss": loss, "lr_max": lr}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, labels: torch.Tensor, rt: runtime.Runtime,
             total: int) -> tuple[float, float]:
    """Top-1/top-5 (percent) over ``total`` val images; each process scores its own shard."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for images, rows, _bad in loader:
        if len(rows) == 0:
            continue
        with rt.autocast():
            logits = model(images.to(rt.device, non_blocking=True)).float().cpu()
        counts[0] += topk_correct(logits, labels[rows], 1)
        counts[1] += topk_correct(logits, labels[rows], 5)
    counts = runtime.all_reduce_sum(counts).cpu()
    return 100.0 * counts[0].item() / total, 100.0 * counts[1].item() / total


def _fingerprint(cfg: FinetuneConfig, backbone: LoadedBackbone, n_train: int, precision: str) -> dict:
    d = cfg.job.data
    return runtime.jsonable({
        "protocol": "finetune", "recipe": asdict(cfg.recipe), "seed": cfg.seed,
        "checkpoint_sha256": backbone.sha256, "student": backbone.student, "arch": repr(backbone.arch),
        "data": [str(d.root), d.train_split, d.val_split, d.resize, d.interpolation],
        "n_train": n_train, "precision": precision,
    })


def _decodable(cfg: FinetuneConfig, splits: tuple[ImageFolderIndex, ImageFolderIndex]
               ) -> tuple[ImageFolderIndex, ImageFolderIndex, list[str]]:
    """Train and val indexes without undecodable images, and those images (class/file)."""
    kept, skipped = [], []
    for index, split in zip(splits, (cfg.job.data.train_split, cfg.job.data.val_split)):
        record = cfg.output_dir / f"decodable-{split}.json" if cfg.output_dir else None
        good, bad = training.drop_undecodable(index, num_workers=cfg.job.extract.num_workers,
                                              strict=cfg.job.extract.strict, record=record)
        kept.append(good)
        skipped += bad
    return kept[0], kept[1], skipped


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune the whole network (resuming if asked); val top-1/top-5, best and last."""
    if cfg.eval_every < 1:
        raise ConfigError("eval_every must be positive")
    if isinstance(cfg.recipe, str):
        FINETUNE_RECIPES.canonical(cfg.recipe)
    clock = Clock()
    train_index, val_index = cfg.job.data.splits()
    rt = runtime.make_runtime(cfg.job.extract.device, cfg.job.extract.resolved_precision())
    backbone = cfg.job.backbone.load()
    recipe, why = resolve_recipe(FINETUNE_RECIPES, "finetune", backbone, cfg.recipe, cfg.overrides)
    cfg = replace(cfg, recipe=recipe)
    if recipe.epochs < 1 or recipe.blr <= 0:
        raise ConfigError("epochs and blr must be positive")
    if cfg.output_dir is not None:
        outputs.claim_run_dir(cfg.output_dir, "finetune", own_files=runtime.RUN_FILES)
    splits = (train_index, val_index)
    train_index, val_index, skipped = _decodable(cfg, splits)
    num_classes = len(train_index.classes)
    plan = runtime.make_plan(recipe.batch_size, cfg.micro_batch or cfg.job.extract.batch_size,
                              rt.dist.world_size)
    steps = training.steps_per_epoch(len(train_index), plan)
    torch.manual_seed(runtime.derive_seed(cfg.seed, 6))
    model = build_model(backbone, num_classes, recipe).to(rt.device)
    lr = recipe.blr * recipe.batch_size / 256
    optimizer = build_optimizer(model, recipe, lr)
    sched = training.Schedule(recipe.epochs * steps, round(recipe.warmup_epochs * steps), recipe.min_lr,
                              recipe.warmup_lr)
    fingerprint = _fingerprint(cfg, backbone, len(train_index), rt.precision)
    state = runtime.resume_from(cfg.output_dir, resume=cfg.resume, config=fingerprint)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    logbook = runtime.JsonlLog(cfg.output_dir / runtime.LOG_NAME if cfg.output_dir else None)
    logbook.truncate(start)
    mixup = make_mixup(recipe, num_classes)
    job = _Run(cfg, rt, plan, steps,
               training.SeededImageDataset(train_index, train_transform(backbone.arch.img_size, recipe),
                                           seed=cfg.seed),
               torch.as_tensor(train_index.labels), mixup, make_criterion(recipe, mixup))
    val_rows = range(rt.dist.rank, len(val_index), rt.dist.world_size)
    val_tf = eval_transform(backbone.arch.img_size, resize=cfg.job.data.resize,
                            interpolation=cfg.job.data.interpolation or "bicubic")
    val_loader = DataLoader(ImageDataset(val_index, val_tf, val_rows), batch_size=plan.micro_batch,
                            num_workers=cfg.job.extract.num_workers, collate_fn=collate_skip_bad)
    val_labels = torch.as_tensor(val_index.labels)
    ddp_model = runtime.wrap_ddp(model, rt)
    for epoch in range(start, recipe.epochs):
        tic = time.time()
        record: dict[str, Any] = {"epoch": epoch, **job.train_epoch(ddp_model, optimizer, sched, epoch)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == recipe.epochs:
            top1, top5 = evaluate(model, val_loader, val_labels, rt, len(val_index))
            history.append({"epoch": epoch, "top1": top1, "top5": top5})
            record.update(val_top1=top1, val_top5=top5)
        logbook.write({**record, "time_s": round(time.time() - tic, 3)})
        if cfg.output_dir is not None:
            runtime.save_checkpoint(cfg.output_dir / runtime.CHECKPOINT_NAME, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "history": history, "config": fingerprint})
    best = max(history, key=lambda h: (h["top1"], h["top5"]))
    last = history[-1]
    result_record = Record(
        "finetune", checkpoint_block(backbone), dataset_info(cfg.job, splits, skipped=skipped),
        {"recipe": recipe_block(recipe.name, runtime.jsonable(asdict(recipe)), why=why),
         "global_batch": plan.global_batch, "micro_batch": plan.micro_batch, "accum": plan.accum,
         "world_size": plan.world_size, "steps_per_epoch": steps, "lr": lr,
         "precision": rt.precision, **transform_info(cfg.job, backbone.arch.img_size), "seed": cfg.seed,
         "eval_every": cfg.eval_every, "resumed_from_epoch": start,
         "n_train": len(train_index), "n_val": len(val_index)},
        metrics_block("top1 (last epoch)", last["top1"],
                      values={"top1": last["top1"], "top5": last["top5"], "best_top1": best["top1"],
                              "best_top5": best["top5"], "best_epoch": best["epoch"]},
                      rows=history),
        clock.provenance())
    return FinetuneResult(best["top1"], best["top5"], best["epoch"], last["top1"], last["top5"],
                          history, len(train_index), len(val_index), result_record)
