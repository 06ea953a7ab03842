"""The shared first half of every protocol: checkpoint -> backbone -> features per split."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from moca_eval.checkpoints import LoadedBackbone, load_backbone
from moca_eval.data import ImageFolderIndex, eval_transform, load_split
from moca_eval.errors import ConfigError
from moca_eval.features import ExtractConfig, FeatureSet, extract_features
from moca_eval.record import dataset_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneConfig:
    """Which weights to evaluate (see ``load_backbone``)."""

    ckpt: Path
    arch: str | None = None
    checkpoint_key: str | None = None
    fmt: str | None = None
    student: bool = False
    img_size: int | None = 224  # None: the checkpoint's own resolution
    num_heads: int | None = None
    family: str | None = None  # None: the layout's (first) family
    allow_nonfinite: bool = False  # evaluate NaN/inf weights (reported) instead of refusing

    def load(self, **overrides: object) -> LoadedBackbone:
        """``load_backbone`` with these settings (``overrides`` replace fields, e.g. img_size)."""
        options = {**self.options(), **overrides}
        return load_backbone(self.ckpt, **options)

    def options(self) -> dict[str, object]:
        """``load_backbone``'s keyword arguments (everything but the path)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ckpt"}

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (mmengine configs, records); ``from_dict`` reads it back."""
        return {"ckpt": str(self.ckpt), **self.options()}

    @classmethod
    def from_dict(cls, values: dict) -> BackboneConfig:
        return cls(**{**values, "ckpt": Path(values["ckpt"])})


@dataclass(frozen=True)
class DataConfig:
    """An ImageFolder dataset and its eval transform (Resize + CenterCrop + ImageNet norm)."""

    root: Path
    train_split: str = "train"
    val_split: str = "val"
    resize: int | None = None  # default: crop / 0.875 (256 for 224)
    interpolation: str | None = "bicubic"  # None: the protocol recipe's
    limit: float | None = None  # smoke runs: images per class (>= 1) or a fraction (0 < x < 1)

    def __post_init__(self) -> None:
        check_limit(self.limit)

    def splits(self) -> tuple[ImageFolderIndex, ImageFolderIndex]:
        """Train and val indexes, labelled with the train classes (cut to ``limit`` if set)."""
        train = load_split(self.root, self.train_split)
        val = load_split(self.root, self.val_split, classes=train.classes)
        if train.root.resolve() == val.root.resolve():
            log.warning("--val-split %s is the training split %s: the accuracy reported is on the "
                        "training images, not held-out ones", self.val_split, self.train_split)
        return limit_per_class(train, self.limit), limit_per_class(val, self.limit)


def check_limit(limit: float | None, unit: str = "images per class") -> None:
    """``limit`` must be a whole number of ``unit`` (>= 1) or a fraction in (0, 1)."""
    if limit is None or 0 < limit < 1 or (limit >= 1 and float(limit).is_integer()):
        return
    raise ConfigError(f"--limit {limit:g}: expected {unit} (1, 2, ...) or a fraction "
                      "between 0 and 1")


def limit_count(limit: float, total: int) -> int:
    """How many of ``total`` items ``limit`` keeps: ``limit`` itself, or ``ceil(limit x total)``
    (at least one) for a fraction; never more than ``total``."""
    return min(total, int(limit) if limit >= 1 else max(1, math.ceil(limit * total)))


def limit_per_class(index: ImageFolderIndex, limit: float | None) -> ImageFolderIndex:
    """The first ``limit`` images of each class (a fraction: ``ceil(limit x class size)``, at
    least one), in dataset order; ``None``: ``index`` itself."""
    if limit is None:
        return index
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(index.labels):
        by_class.setdefault(label, []).append(row)
    keep = []
    for rows in by_class.values():
        keep.extend(rows[:limit_count(limit, len(rows))])
    return index.subset(sorted(keep))


@dataclass(frozen=True)
class FeatureJob:
    """Everything needed to turn a checkpoint into train/val features."""

    backbone: BackboneConfig
    data: DataConfig
    extract: ExtractConfig = field(default_factory=ExtractConfig)


def check_train_size(job: FeatureJob, train_index: ImageFolderIndex, need: int, why: str) -> None:
    """A train split of fewer than ``need`` images is a ConfigError (before any loading)."""
    if len(train_index) < need:
        raise ConfigError(f"{why} exceeds the {len(train_index)} training images of {job.data.root}")


def extract_splits(job: FeatureJob, names: Sequence[str], backbone: LoadedBackbone,
                   splits: tuple[ImageFolderIndex, ImageFolderIndex]) -> tuple[FeatureSet, FeatureSet]:
    """Train and val features for ``names`` of ``splits`` (cached: a second protocol reuses them)."""
    transform = eval_transform(backbone.arch.img_size, resize=job.data.resize,
                               interpolation=job.data.interpolation or "bicubic")
    train = extract_features(backbone, splits[0], names, job.extract, transform=transform)
    val = extract_features(backbone, splits[1], names, job.extract, transform=transform)
    return train, val


def dataset_info(job: FeatureJob, splits: tuple[ImageFolderIndex, ImageFolderIndex], *,
                 skipped: Sequence[str] = ()) -> dict:
    """The record's ``dataset`` block for a train/val ImageFolder job."""
    d = job.data
    return dataset_block(d.root, splits={d.train_split: splits[0], d.val_split: splits[1]},
                         n_classes=len(splits[0].classes), skipped=skipped,
                         **({"limit": d.limit} if d.limit is not None else {}))


def transform_info(job: FeatureJob, img_size: int) -> dict:
    """The eval transform's settings, for a record's ``config``."""
    d = job.data
    return {"img_size": img_size, "resize": d.resize, "interpolation": d.interpolation or "bicubic"}
