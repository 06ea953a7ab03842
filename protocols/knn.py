"""Weighted k-NN classification on frozen features (DINO's ``eval_knn``; MOCA paper Sec. C.3).

Features are L2-normalised; ONE inner-product search at the largest k (FAISS, on GPU when
one is visible) serves every (k, T): class score = sum over the k nearest training images
of ``exp(similarity / T)`` for their class. Top-1 and top-5 in percent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moca_eval.errors import ConfigError
from moca_eval.families import FAMILIES, announce
from moca_eval.features import check_feature_name
from moca_eval.pipeline import FeatureJob, check_train_size, dataset_info, extract_splits, transform_info
from moca_eval.record import Clock, Record, checkpoint_block, metrics_block, recipe_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnConfig:
    """k-NN settings; ``feature=None`` takes the checkpoint recipe's default."""

    job: FeatureJob
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperatures: tuple[float, ...] = (0.07,)
    feature: str | None = None
    use_gpu: bool | None = None  # None: FAISS GPU index when faiss sees a GPU
    seed: int = 0


@dataclass(frozen=True)
class KnnScore:
    k: int
    temperature: float
    top1: float
    top5: float


@dataclass
class KnnResult:
    scores: list[KnnScore]
    feature: str
    n_train: int
    n_val: int
    record: Record

    def to_dict(self) -> dict:
        return self.record.to_dict()


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous, as FAISS wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search(train: np.ndarray, query: np.ndarray, k: int, *, use_gpu: bool | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each query row with ``train``: ``(sims, ids)``."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(train)
    return index.search(query, k)


def knn_vote(sims: torch.Tensor, neighbor_labels: torch.Tensor, *, k: int, temperature: float,
             num_classes: int) -> torch.Tensor:
    """Class scores ``[Q, C]``: sum of ``exp(sim / T)`` over the first ``k`` neighbours."""
    weights = (sims[:, :k] / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbor_labels[:, :k], weights)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the ``k`` best scores (ties: lower class first)."""
    best = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return int((best == labels[:, None]).any(dim=1).sum())


def evaluate(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
             ks: Sequence[int], temperatures: Sequence[float], num_classes: int,
             use_gpu: bool | None = None, chunk: int = 8192) -> list[KnnScore]:
    """k-NN accuracy for every (k, T) from a single search at ``max(ks)``."""
    if max(ks) > len(train_x):
        raise ConfigError(f"k={max(ks)} exceeds the {len(train_x)} training images")
    sims, ids = search(l2_normalize(train_x), l2_normalize(val_x), max(ks), use_gpu=use_gpu)
    sims_t = torch.from_numpy(sims)
    neighbor_labels = torch.from_numpy(np.asarray(train_y, dtype=np.int64)[ids])
    labels = torch.from_numpy(np.asarray(val_y, dtype=np.int64))
    out = []
    for k in ks:
        for t in temperatures:
            top1 = top5 = 0
            for start in range(0, len(labels), chunk):
                part = slice(start, start + chunk)
                scores = knn_vote(sims_t[part], neighbor_labels[part], k=k, temperature=t,
                                  num_classes=num_classes)
                top1 += topk_correct(scores, labels[part], 1)
                top5 += topk_correct(scores, labels[part], 5)
            out.append(KnnScore(k, t, 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)))
    return out


def headline_score(scores: Sequence[KnnScore]) -> KnnScore:
    """The paper's setting: k=20 at the first temperature; else the first (k, T)."""
    return next((s for s in scores if s.k == 20), scores[0])


def run(cfg: KnnConfig) -> KnnResult:
    """Load the checkpoint, extract (or reuse cached) features, evaluate every (k, T)."""
    if not cfg.ks or min(cfg.ks) < 1 or not cfg.temperatures or min(cfg.temperatures) <= 0:
        raise ConfigError("k values must be >= 1 and temperatures > 0")
    if cfg.feature is not None:
        check_feature_name(cfg.feature)
    clock = Clock()
    splits = cfg.job.data.splits()
    check_train_size(cfg.job, splits[0], max(cfg.ks), f"k={max(cfg.ks)}")
    backbone = cfg.job.backbone.load()
    family = FAMILIES.get(backbone.family)
    feature = check_feature_name(cfg.feature or family.feature)
    why = "--feature" if cfg.feature else f"family {family.name}"
    announce("knn", backbone.family_choice, f"{family.name} (feature {feature})", why)
    train, val = extract_splits(cfg.job, [feature], backbone, splits)
    scores = evaluate(train.features[feature], train.labels, val.features[feature], val.labels,
                      ks=cfg.ks, temperatures=cfg.temperatures, num_classes=len(train.classes),
                      use_gpu=cfg.use_gpu)
    head = headline_score(scores)
    record = Record(
        "knn", checkpoint_block(backbone),
        dataset_info(cfg.job, splits, skipped=train.skipped + val.skipped),
        {"recipe": recipe_block(family.name, {"feature": family.feature}, why=f"family {family.name}"),
         "feature": feature, "ks": list(cfg.ks), "temperatures": list(cfg.temperatures),
         "precision": cfg.job.extract.resolved_precision(), **transform_info(cfg.job, backbone.arch.img_size),
         "n_train": len(train), "n_val": len(val), "seed": cfg.seed},
        metrics_block(f"top1@k={head.k},T={head.temperature:g}", head.top1,
                      values={"top1": head.top1, "top5": head.top5},
                      rows=[asdict(s) for s in scores]),
        clock.provenance())
    return KnnResult(scores, feature, len(train), len(val), record)
