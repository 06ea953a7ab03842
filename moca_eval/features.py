"""Feature extraction: every PROTOCOLS.md feature variant from ONE forward pass, cached on disk.

Variants (``FEATURES``): ``cls`` (final-LN CLS), ``avg`` (mean of final-LN patch tokens,
registers excluded), ``cls+avg``, ``avg-prenorm`` / ``cls-prenorm`` (last block, no final LN),
and ``cls-lastN`` (final-LN CLS of each of the last N blocks, concatenated, oldest first:
DINO's linear-probe feature, N=4 for ViT-S; N may not exceed the depth).

With a cache directory, cached variants are not recomputed (``feature_cache``) and an
extraction in progress is written in shards a rerun continues from (``feature_shards``).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader
from tqdm import tqdm

from moca_eval import distributed
from moca_eval.checkpoints import LoadedBackbone
from moca_eval.data import ImageDataset, ImageFolderIndex, collate_skip_bad, eval_transform
from moca_eval.errors import ConfigError, DatasetError
from moca_eval.feature_cache import FeatureCache, cache_key
from moca_eval.feature_shards import Shard, ShardStore, merge

log = logging.getLogger(__name__)

FEATURES = ("cls", "avg", "cls+avg", "avg-prenorm", "cls-prenorm", "cls-last4")
_LAST_N = re.compile(r"^cls-last(\d+)$")
Precision = Literal["auto", "fp32", "bf16"]


def check_feature_name(name: str) -> str:
    """Validate a feature name (any ``cls-lastN`` is accepted)."""
    m = _LAST_N.match(name)
    if m and int(m.group(1)) < 1:
        raise ConfigError(f"feature {name}: cls-lastN needs N >= 1 blocks")
    if name in FEATURES or m:
        return name
    raise ConfigError(f"unknown feature {name!r}; known: {', '.join(FEATURES)} (or cls-lastN)")


def check_feature_depth(names: Sequence[str], depth: int) -> None:
    """A ``cls-lastN`` feature needs at least N blocks."""
    if _last_n(names) > depth:
        name = next(n for n in names if (m := _LAST_N.match(n)) and int(m.group(1)) > depth)
        raise ConfigError(f"feature {name} needs the last {_last_n(names)} blocks; the checkpoint "
                          f"has {depth}")


def features_for_depth(names: Sequence[str], depth: int, *, requested: bool) -> tuple[str, ...]:
    """``names`` a ``depth``-block model can give: a recipe's default ``cls-lastN`` deeper than the
    model is dropped with a warning; one the user ``requested`` is a ConfigError."""
    if requested:
        check_feature_depth(names, depth)
    kept = tuple(n for n in names if not ((m := _LAST_N.match(n)) and int(m.group(1)) > depth))
    if len(kept) < len(names):
        log.warning("the recipe's feature(s) %s need more than the %d block(s) of this checkpoint; "
                    "evaluating %s", ", ".join(n for n in names if n not in kept), depth, ", ".join(kept))
    return kept


def _last_n(names: Sequence[str]) -> int:
    return max([int(m.group(1)) for n in names if (m := _LAST_N.match(n))], default=1)


@torch.no_grad()
def compute_features(model: VisionTransformer, images: torch.Tensor, names: Sequence[str]
                     ) -> dict[str, torch.Tensor]:
    """All requested variants for a batch, from one pass through ``model``'s blocks."""
    keep = _last_n(names)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    last: list[torch.Tensor] = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i >= len(model.blocks) - keep:
            last.append(x)
    prefix = model.num_prefix_tokens
    normed = model.norm(x)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "cls":
            out[name] = normed[:, 0]
        elif name == "avg":
            out[name] = normed[:, prefix:].mean(1)
        elif name == "cls+avg":
            out[name] = torch.cat([normed[:, 0], normed[:, prefix:].mean(1)], dim=-1)
        elif name == "avg-prenorm":
            out[name] = x[:, prefix:].mean(1)
        elif name == "cls-prenorm":
            out[name] = x[:, 0]
        elif m := _LAST_N.match(name):
            n = int(m.group(1))
            out[name] = torch.cat([model.norm(t)[:, 0] for t in last[len(last) - n:]], dim=-1)
        else:
            check_feature_name(name)
    return {name: value.float() for name, value in out.items()}


@dataclass(frozen=True)
class ExtractConfig:
    """How to run the backbone (the same options on every command)."""

    batch_size: int = 128
    num_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    device: str = "auto"
    precision: Precision = "auto"
    cache_dir: Path | None = None
    strict: bool = False  # an undecodable image is an error instead of a warning
    verify_data: bool = False  # cache key over image contents (sha256), not sizes and times
    shard_images: int = 8192  # images per resumable shard of an extraction in progress

    def __post_init__(self) -> None:
        if self.shard_images < 1:
            raise ConfigError(f"--shard-images must be >= 1, got {self.shard_images}")

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.current().local_rank)
        return torch.device("cpu")

    def resolved_precision(self) -> Literal["fp32", "bf16"]:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.resolved_device().type == "cuda" else "fp32"


@dataclass
class FeatureSet:
    """Features of one split in dataset order, minus images that could not be decoded."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def extract_features(
    backbone: LoadedBackbone,
    index: ImageFolderIndex,
    names: Sequence[str],
    cfg: ExtractConfig,
    *,
    transform: Callable | None = None,
) -> FeatureSet:
    """Features ``names`` for every image of ``index``; cached variants are not recomputed.

    Under ``torchrun`` each process extracts a shard and every process returns the
    complete, identically ordered result.
    """
    names = [check_feature_name(n) for n in dict.fromkeys(names)]
    check_feature_depth(names, backbone.arch.depth)
    transform = transform or eval_transform(backbone.arch.img_size)
    precision = cfg.resolved_precision()
    keys = {n: cache_key(backbone, index, transform, n, precision, verify_data=cfg.verify_data)
            for n in names}
    cache = FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
    found = {}
    if cache:
        cache.remove_stale_temp(keys.values())
        found = {n: cache.load(keys[n], len(index), dim=_feature_dim(backbone, n)) for n in names}
    found = {n: v for n, v in found.items() if v is not None}
    todo = [n for n in names if n not in found]
    if todo:
        info = distributed.current()
        store = ShardStore(cfg.cache_dir, {n: keys[n] for n in todo}, rank=info.rank,
                           world_size=info.world_size) if cfg.cache_dir else None
        computed, present = _run_backbone(backbone, index, todo, cfg, transform, precision, store)
        for n in todo:
            found[n] = (computed[n], present)
            if cache and info.is_main:
                cache.save(keys[n], computed[n], present)
        distributed.barrier()
        if store:
            store.remove()
    present = next(iter(found.values()))[1]
    return _assemble(index, {n: found[n][0] for n in names}, present, strict=cfg.strict)


def _assemble(index: ImageFolderIndex, feats: dict[str, np.ndarray], present: np.ndarray,
              *, strict: bool) -> FeatureSet:
    rel = index.relpaths()
    skipped = [rel[i] for i in np.flatnonzero(~present)]
    if skipped and strict:
        raise DatasetError(f"{index.root}: cannot decode {len(skipped)} image(s): {', '.join(skipped[:5])}")
    if skipped:
        log.warning("skipped %d undecodable image(s) in %s: %s", len(skipped), index.root,
                    ", ".join(skipped[:10]))
    keep = np.flatnonzero(present)
    if len(keep) == 0:
        raise DatasetError(f"{index.root}: none of its {len(rel)} image(s) could be decoded "
                           f"(e.g. {', '.join(rel[:3])})")
    return FeatureSet(
        features={n: np.ascontiguousarray(v[keep]) for n, v in feats.items()},
        labels=np.asarray(index.labels, dtype=np.int64)[keep],
        paths=[rel[i] for i in keep],
        classes=list(index.classes),
        skipped=skipped,
    )


def _run_backbone(backbone: LoadedBackbone, index: ImageFolderIndex, names: Sequence[str],
                  cfg: ExtractConfig, transform: Callable, precision: str, store: ShardStore | None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of every row of ``index`` (dataset order) and the mask of decoded rows.

    Each process runs its rows, continuing after the shards ``store`` already holds.
    """
    info = distributed.current()
    rows = list(range(info.rank, len(index), info.world_size))
    shards = store.load() if store else []
    start = shards[-1].stop if shards else 0
    if start < len(rows):
        shards += _run_rows(backbone, index, rows, start, names, cfg, transform, precision, store,
                            first=len(shards))
    got, feats = merge(shards, names)
    out: dict[str, np.ndarray] = {}
    present = np.zeros(len(index), dtype=bool)
    for n in names:
        values = torch.from_numpy(feats[n]) if n in feats else torch.empty(0, _feature_dim(backbone, n))
        full, mask = distributed.gather_rows(values, torch.from_numpy(got).long(), len(index))
        out[n], present = full.numpy(), mask.numpy()
    return out, present


def _run_rows(backbone: LoadedBackbone, index: ImageFolderIndex, rows: Sequence[int], start: int,
              names: Sequence[str], cfg: ExtractConfig, transform: Callable, precision: str,
              store: ShardStore | None, *, first: int) -> list[Shard]:
    """Run the backbone on ``rows[start:]``, cutting (and saving) a shard every ``shard_images``."""
    device = cfg.resolved_device()
    model, dtype = backbone.model, torch.float32
    if precision == "bf16" and device.type == "cpu":
        # a copy cast to bf16 beats CPU autocast, which converts around every matmul (BENCHMARKS.md)
        model, dtype = copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16
    model = model.to(device).eval()
    loader = DataLoader(
        ImageDataset(index, transform, rows[start:]), batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        collate_fn=collate_skip_bad, persistent_workers=False,
    )
    size = -(-cfg.shard_images // cfg.batch_size) * cfg.batch_size if store else len(rows)
    shards: list[Shard] = []
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    done: list[torch.Tensor] = []
    position = shard_start = start
    bar = tqdm(loader, desc=f"features {index.root.name}", unit="batch",
               disable=not distributed.current().is_main)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=precision == "bf16" and device.type != "cpu"):
        for images, batch_rows, bad in bar:
            position += len(batch_rows) + len(bad)
            if len(batch_rows):
                feats = compute_features(model, images.to(device, dtype, non_blocking=True), names)
                for n in names:
                    parts[n].append(feats[n].cpu())
                done.append(batch_rows)
            if position - shard_start >= size or position == len(rows):
                shards.append(_cut(shard_start, position, done, parts, backbone))
                if store and not store.save(first + len(shards) - 1, shards[-1]):
                    store = None
                shard_start, done, parts = position, [], {n: [] for n in names}
    backbone.model.cpu()
    return shards


def _cut(start: int, stop: int, done: list[torch.Tensor], parts: dict[str, list[torch.Tensor]],
         backbone: LoadedBackbone) -> Shard:
    rows = torch.cat(done).numpy() if done else np.empty(0, dtype=np.int64)
    feats = {n: torch.cat(v).numpy() if v else np.empty((0, _feature_dim(backbone, n)), np.float32)
             for n, v in parts.items()}
    return Shard(start, stop, rows, feats)


def _feature_dim(backbone: LoadedBackbone, name: str) -> int:
    width = backbone.arch.embed_dim
    if name == "cls+avg":
        return 2 * width
    m = _LAST_N.match(name)
    return width * int(m.group(1)) if m else width
