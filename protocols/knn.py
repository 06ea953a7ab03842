"""Weighted k-NN classification on frozen features (DINO's ``eval_knn``; MOCA paper Sec. C.3).

Features are L2-normalised; ONE inner-product search at the largest k serves every (k, T):
class score = sum over the k nearest training images of ``exp(similarity / T)`` for their
class. Top-1 and top-5 in percent.

Memory: about one copy of the train features. ``run`` normalises them in place, and the
search never builds a FAISS index (which would copy them): the train rows are searched in
shards (``faiss.knn`` on views; on GPU ``faiss.knn_gpu``, each shard sized to the device's
free memory and the shards spread over ``faiss.get_num_gpus()`` devices), the per-shard
top-k lists merged into the running top-k. Sharded and unsharded results are identical (ties
at equal similarity: lower train row first). ``index_dtype='float16'`` stores the normalised
train features in half precision (half the memory of the index; accuracy impact measured in
BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from moca_eval.errors import ConfigError
from moca_eval.families import FAMILIES, announce
from moca_eval.features import check_feature_name
from moca_eval.pipeline import FeatureJob, check_train_size, dataset_info, extract_splits, transform_info
from moca_eval.record import Clock, Record, checkpoint_block, metrics_block, recipe_block

log = logging.getLogger(__name__)

IndexDType = Literal["float32", "float16"]
CPU_SHARD_ROWS = 1 << 18  # train rows per faiss.knn call on CPU (views: no copy in float32)
CPU_FP16_SHARD_ROWS = 1 << 14  # float16 shards are widened to float32 on CPU: keep them small
NORMALIZE_ROWS = 1 << 12  # rows normalised at a time (np.linalg.norm squares a block: 12 MB at 768-d)
GPU_MEMORY_FRACTION = 0.5  # of the free device memory one train shard may take


@dataclass(frozen=True)
class KnnConfig:
    """k-NN settings; ``feature=None`` takes the checkpoint recipe's default."""

    job: FeatureJob
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperatures: tuple[float, ...] = (0.07,)
    feature: str | None = None
    use_gpu: bool | None = None  # None: FAISS on GPU when faiss sees a GPU
    seed: int = 0
    index_dtype: IndexDType = "float32"
    shard_rows: int | None = None  # None: CPU_SHARD_ROWS, or sized to the GPU's free memory


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


def l2_normalize(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous, as FAISS wants) in a new array;
    with ``inplace`` in ``x`` itself when it is float32, C-contiguous and writeable."""
    if inplace:
        return l2_normalize_(np.require(x, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
    return l2_normalize_(np.array(x, dtype=np.float32, order="C", copy=True))


def l2_normalize_(x: np.ndarray) -> np.ndarray:
    """Normalise the rows of a float32 C-contiguous array in place, a block of rows at a time."""
    for start in range(0, len(x), NORMALIZE_ROWS):
        part = x[start:start + NORMALIZE_ROWS]
        part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
    return x


def to_index_dtype(x: np.ndarray, dtype: IndexDType) -> np.ndarray:
    """``x`` (normalised float32) stored as ``dtype``; converted a block of rows at a time."""
    if dtype == "float32":
        return x
    if dtype != "float16":
        raise ConfigError(f"index dtype must be float32 or float16, got {dtype!r}")
    out = np.empty(x.shape, dtype=np.float16)
    for start in range(0, len(x), NORMALIZE_ROWS):
        out[start:start + NORMALIZE_ROWS] = x[start:start + NORMALIZE_ROWS]
    return out


def merge_topk(sims: np.ndarray, ids: np.ndarray, new_sims: np.ndarray, new_ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of two top-k lists per row (descending; ties keep the first list first)."""
    all_sims = np.concatenate([sims, new_sims], axis=1)
    all_ids = np.concatenate([ids, new_ids], axis=1)
    order = np.argsort(-all_sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_sims, order, 1), np.take_along_axis(all_ids, order, 1)


def search(train: np.ndarray, query: np.ndarray, k: int, *, use_gpu: bool | None = None,
           shard_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each query row with ``train``: ``(sims, ids)``.

    ``train`` (float32 or float16) is searched in shards of ``shard_rows`` rows without
    copying it whole; ``query`` is float32 C-contiguous.
    """
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    gpus = faiss.get_num_gpus() if use_gpu is None or use_gpu else 0
    if use_gpu and gpus == 0:
        raise ConfigError("--faiss-gpu asked for, but faiss sees no GPU")
    if gpus:
        searcher = GpuShardSearch(faiss, gpus, query)
        rows = shard_rows or searcher.shard_rows(train)
    else:
        default = CPU_SHARD_ROWS if train.dtype == np.float32 else CPU_FP16_SHARD_ROWS
        searcher, rows = CpuShardSearch(faiss, query), shard_rows or default
    sims = np.full((len(query), 0), -np.inf, dtype=np.float32)
    ids = np.zeros((len(query), 0), dtype=np.int64)
    for n, start in enumerate(range(0, len(train), rows)):
        part = train[start:start + rows]
        s, i = searcher(part, min(k, len(part)), n)
        sims, ids = merge_topk(sims, ids, s, i + start, k)
    return sims, ids


class CpuShardSearch:
    """``faiss.knn`` on one train shard (float16 shards are widened one at a time)."""

    def __init__(self, faiss, query: np.ndarray) -> None:
        self.faiss, self.query = faiss, query

    def __call__(self, part: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        part = np.ascontiguousarray(part, dtype=np.float32)
        return self.faiss.knn(self.query, part, k, self.faiss.METRIC_INNER_PRODUCT)


class GpuShardSearch:
    """``faiss.knn_gpu`` on one train shard; shard n goes to GPU ``n % gpus``."""

    def __init__(self, faiss, gpus: int, query: np.ndarray) -> None:
        self.faiss, self.gpus = faiss, gpus
        self.query = {np.dtype(np.float32): query}  # bfKnn wants queries of the train's dtype
        self.resources = [faiss.StandardGpuResources() for _ in range(gpus)]

    def shard_rows(self, train: np.ndarray) -> int:
        free = min(torch.cuda.mem_get_info(d)[0] for d in range(self.gpus))
        query = self.query[np.dtype(np.float32)]
        return gpu_shard_rows(free, train.shape[1], train.itemsize, len(query))

    def __call__(self, part: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        device = n % self.gpus
        if part.dtype not in self.query:
            self.query[part.dtype] = self.query[np.dtype(np.float32)].astype(part.dtype)
        return self.faiss.knn_gpu(self.resources[device], self.query[part.dtype],
                                  np.ascontiguousarray(part), k,
                                  metric=self.faiss.METRIC_INNER_PRODUCT, device=device)


def gpu_shard_rows(free_bytes: int, dim: int, itemsize: int, n_query: int) -> int:
    """Train rows per GPU shard: ``GPU_MEMORY_FRACTION`` of the free memory, less the queries."""
    budget = GPU_MEMORY_FRACTION * free_bytes - 4 * n_query * dim
    rows = int(budget // (dim * itemsize))
    if rows < 1024:
        raise ConfigError(f"the GPU has {free_bytes / 2**30:.1f} GiB free: not enough for a "
                          f"k-NN shard of 1024 x {dim} train features; use --no-faiss-gpu")
    return rows


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
             use_gpu: bool | None = None, chunk: int = 8192, inplace: bool = False,
             index_dtype: IndexDType = "float32", shard_rows: int | None = None,
             ) -> list[KnnScore]:
    """k-NN accuracy for every (k, T) from a single search at ``max(ks)``.

    ``inplace=True`` normalises ``train_x`` and ``val_x`` in place when they are float32
    C-contiguous and writeable (no copy; ``run`` does this), else a normalised copy is used.
    """
    if max(ks) > len(train_x):
        raise ConfigError(f"k={max(ks)} exceeds the {len(train_x)} training images")
    train = to_index_dtype(l2_normalize(train_x, inplace=inplace), index_dtype)
    query = l2_normalize(val_x, inplace=inplace)
    sims, ids = search(train, query, max(ks), use_gpu=use_gpu, shard_rows=shard_rows)
    del train
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
    if not cfg.ks or min(cfg.ks) < 1 or not cfg.temperatures or not all(
            0 < t < math.inf for t in cfg.temperatures):  # NaN fails both comparisons
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
    scores = evaluate(train.features.pop(feature), train.labels, val.features.pop(feature),
                      val.labels, ks=cfg.ks, temperatures=cfg.temperatures,
                      num_classes=len(train.classes), use_gpu=cfg.use_gpu, inplace=True,
                      index_dtype=cfg.index_dtype, shard_rows=cfg.shard_rows)
    head = headline_score(scores)
    record = Record(
        "knn", checkpoint_block(backbone),
        dataset_info(cfg.job, splits, skipped=train.skipped + val.skipped),
        {"recipe": recipe_block(family.name, {"feature": family.feature}, why=f"family {family.name}"),
         "feature": feature, "index_dtype": cfg.index_dtype, "ks": list(cfg.ks),
         "temperatures": list(cfg.temperatures),
         "precision": cfg.job.extract.resolved_precision(), **transform_info(cfg.job, backbone.arch.img_size),
         "n_train": len(train), "n_val": len(val), "seed": cfg.seed},
        metrics_block(f"top1@k={head.k},T={head.temperature:g}", head.top1,
                      values={"top1": head.top1, "top5": head.top5},
                      rows=[asdict(s) for s in scores]),
        clock.provenance())
    return KnnResult(scores, feature, len(train), len(val), record)
